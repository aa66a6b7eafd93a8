"""
A resume is exact, and nothing but the config's seed and the step decides what training computes:
    python3 -m pytest -q -n 2 test_resume_is_exact.py
- stopped and resumed, a run ends with the same weights and optimizer state as an unbroken one (torch.equal), with
  dropout, and in float16 with the GradScaler;
- a checkpoint written before the optimizer's groups had names, or before a loop-state key existed, resumes exactly;
- other eval, log and checkpoint intervals give the same weights; gradient accumulation splits the same global batch;
- deterministic mode is set up, inherited at a resume, and undone after the run.
"""
import os

import pytest
import torch

import checkpoint
from conftest import assert_identical, run, state_at, tensors


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


def test_float16_with_the_grad_scaler_resumes_exactly(tmp_path, dataset):
    run(tmp_path / "a", dataset, "--max_iters=6", "--checkpoint_interval=3", "--dtype=float16")
    run(tmp_path / "b", dataset, "--max_iters=3", "--dtype=float16")
    run(tmp_path / "b", dataset, "--max_iters=6")
    assert_identical(state_at(tmp_path / "a", 6), state_at(tmp_path / "b", 6))
    assert state_at(tmp_path / "a", 6)["scaler"] == state_at(tmp_path / "b", 6)["scaler"]


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
