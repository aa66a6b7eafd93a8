"""
The metrics are the live timeline: metrics.jsonl and wandb follow resumes and rewinds, with no line logged twice
or torn:  python3 -m pytest -q test_metrics.py
"""
import glob

import pytest

from conftest import read_metrics, run, state_at


def test_metrics_are_the_history_of_the_live_timeline(tmp_path, dataset):
    run(tmp_path, dataset, "--max_iters=20", "--checkpoint_interval=10", "--log_interval=5", "--eval_interval=10")
    lines = read_metrics(tmp_path)
    assert [m["step"] for m in lines[:3]] == [0, 5, 10] and lines[0]["event"] == "start"
    for m in lines[1:3]:  # what plot.py and wandb read; a fork may log more
        assert {"loss", "lr", "ms_per_step", "tokens", "tokens_per_s"} <= set(m), m
    assert [m["step"] for m in lines if "val_loss" in m] == [10, 20] and lines[2]["tokens"] == 10 * 4 * 16
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 21, "loss": 2.')  # a crash cut the last line short
    run(tmp_path, dataset, "--max_iters=20", "--from_checkpoint_step=10")  # a rewind: steps 11-20 leave the history
    lines = read_metrics(tmp_path)
    assert [m["step"] for m in lines] == [0, 5, 10, 10, 10, 15, 20, 20]
    assert lines[4] == {"step": 10, "time": lines[4]["time"], "event": "resume"}
    (aside,) = glob.glob(str(tmp_path / "abandoned-*"))
    assert [m["step"] for m in read_metrics(aside)] == [15, 20, 20]


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
