"""
Where a run starts, and what its command changes:  python3 -m pytest -q -n 2 test_where_a_run_starts.py
- any step can be resumed: the newest by default, or exactly step N (a rewind, which moves newer checkpoints to
  abandoned-<time>/ and deletes nothing), or none (step 0); a step that is not there is one line listing those that are;
- a partial command continues the same run: every key it does not set comes from the checkpoint, a key it sets
  applies (the optimizer's too), a change of shape is refused, and dtype may change;
- init_from starts a fresh run from another run's weights (a new optimizer); eval_only evaluates and writes nothing.
"""
import glob
import os
import re

import pytest
import torch

import char_dataset  # in data/: conftest.py puts that folder on sys.path
import checkpoint
import model
import outdir
import train
from configurator import ConfigError
from conftest import assert_identical, files_and_mtimes, run, state_at


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


def test_absent_step_is_an_error_listing_the_steps(tmp_path, dataset):
    run(tmp_path, dataset, "--max_iters=10", "--checkpoint_interval=5")
    with pytest.raises(checkpoint.CheckpointError, match=r"no checkpoint for step 7 .*\(steps available: 5, 10\)"):
        run(tmp_path, dataset, "--max_iters=10", "--from_checkpoint_step=7")


# --- a partial command ---------------------------------------------------------------------------------------------

def test_a_resume_continues_the_same_run_from_a_partial_command(tmp_path, dataset, capsys):
    """Every key comes from the checkpoint unless this command sets it: --out_dir alone carries on exactly."""
    own = ["--keep_last_checkpoints=2", "--learning_rate=3e-3", "--weight_decay=0.05", "--dropout=0.1",
           "--checkpoint_interval=5", "--seed=7", "--beta2=0.95"]
    run(tmp_path / "unbroken", dataset, *own, "--max_iters=20")
    run(tmp_path / "resumed", dataset, *own, "--max_iters=10")
    capsys.readouterr()
    train.main([f"--out_dir={tmp_path / 'resumed'}", "--max_iters=20"])
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("resuming from step 10") and "max_iters: 10 -> 20" in first, first
    assert first.count("->") == 1, first  # the one key this command changed
    assert_identical(state_at(tmp_path / "unbroken", 20), state_at(tmp_path / "resumed", 20))
    assert checkpoint.list_steps(str(tmp_path / "resumed")) == [10, 15, 20]  # keep 2 newest + the resumed step
    # a key this command sets wins, the optimizer's included: its loaded param groups must not keep the old values
    train.main([f"--out_dir={tmp_path / 'resumed'}", "--max_iters=25", "--weight_decay=0.2", "--beta1=0.8"])
    groups = state_at(tmp_path / "resumed", 25)["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.2, 0.0]
    assert all(g["betas"] == (0.8, 0.95) for g in groups if "betas" in g)  # an optimizer with betas: AdamW's


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
    # every key of the trainer's is tested (a fork's new key is reported like any other: test_a_fork_keeps_...)
    assert set(CHANGED_AT_RESUME) | set(outdir.RUN_KEYS) | tested_elsewhere <= {k for k, _, _ in train.CONFIG}
    run(tmp_path / "base", dataset, "--max_iters=3")
    for key, value in CHANGED_AT_RESUME.items():
        out = tmp_path / key
        out.mkdir()
        os.link(checkpoint.path_for(str(tmp_path / "base"), 3), checkpoint.path_for(str(out), 3))
        flags = [f"--out_dir={out}", f"--{key}={value!r}"] + ([] if key == "max_iters" else ["--max_iters=6"])
        if key in model.SHAPE_KEYS:
            with pytest.raises(ConfigError, match=rf"^{key}={re.escape(repr(value))} contradicts checkpoint step 3"):
                train.main(flags)
        else:
            train.main(flags)
            assert state_at(out, 6 if key != "max_iters" else 7)["config"][key] == value


def test_shape_flags_conflicting_with_the_checkpoint_are_errors(tmp_path, dataset):
    run(tmp_path, dataset, "--max_iters=5")
    with pytest.raises(ConfigError, match=r"n_layer=3 contradicts checkpoint step 5, whose model has n_layer=2"):
        run(tmp_path, dataset, "--max_iters=10", "--n_layer=3")
    # without the flag, the shape comes from the checkpoint
    train.main([f"--dataset={dataset}", f"--out_dir={tmp_path}", "--device=cpu", "--max_iters=6", "--eval_iters=1",
                "--batch_size=2", "--lr_decay_iters=6", "--warmup_iters=1"])
    assert state_at(tmp_path, 6)["model_args"] == state_at(tmp_path, 5)["model_args"]


def test_dtype_may_change_at_a_resume(tmp_path, dataset):
    run(tmp_path, dataset, "--max_iters=3", "--dtype=float32")
    run(tmp_path, dataset, "--max_iters=6", "--dtype=float16")  # the GradScaler starts anew
    assert state_at(tmp_path, 6)["scaler"]["scale"] > 0
    run(tmp_path, dataset, "--max_iters=9", "--dtype=float32")
    assert state_at(tmp_path, 9)["scaler"] == {}


# --- other weights, or none written --------------------------------------------------------------------------------

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
