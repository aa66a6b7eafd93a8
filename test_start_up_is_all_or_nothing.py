"""
Start-up is all or nothing (outdir.py, housekeeping.py), on tiny models on the CPU:
    python3 -m pytest -q -n 2 test_start_up_is_all_or_nothing.py
- a rewind crashed after any of its file operations loses nothing, and a rerun completes it exactly
  (housekeeping.rewind);
- a signal during start-up (here: mid-rewind) is handled as one in the loop: the rewind completes, one step is
  trained and saved, the run ends cleanly;
- every kind of leftover a crash leaves is cleaned at the next start, and nothing that holds history
  (housekeeping.clean_leftovers);
- wandb failing to start changes nothing on disk, not even a fresh out_dir's creation (outdir.Run.open);
- no error comes after the line that says where the run starts: every check is made before it.
"""
import glob
import json
import os
import shutil
import signal

import pytest

import checkpoint
import housekeeping
import train
from configurator import ConfigError
from conftest import TINY, assert_identical, contents, listing, run, state_at


TIMING = ("time", "ms_per_step", "tokens_per_s", "mfu")  # what differs between two runs computing the same steps


def lines(path):
    with open(path, "rb") as f:
        return f.readlines()


def step_of(line):
    return json.loads(line)["step"]


def records(path):
    """metrics.jsonl's entries without their timings: what two runs computing the same steps have alike."""
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines(path)]


def abandoned_folders(out_dir):
    return sorted(glob.glob(os.path.join(str(out_dir), "abandoned-*")))


@pytest.fixture(scope="session")
def run_to_step_30(tmp_path_factory, dataset):
    """A run to step 30 with checkpoints 10, 20, 30 and its metrics.jsonl, at learning_rate 5e-3: the timeline a
    rewind to step 10 (at another rate) abandons. Made once; each test changes a copy of it (at_step_30)."""
    base = tmp_path_factory.mktemp("at_step_30")
    run(base, dataset, "--max_iters=30", "--checkpoint_interval=10", "--learning_rate=5e-3")
    assert checkpoint.list_steps(str(base)) == [10, 20, 30] and os.path.exists(base / "metrics.jsonl")
    return base


@pytest.fixture
def at_step_30(tmp_path, run_to_step_30):
    """run_to_step_30's folder, copied to tmp_path/base for this test to change."""
    base = tmp_path / "base"
    shutil.copytree(run_to_step_30, base)
    return base


REWIND = ["--from_checkpoint_step=10", "--max_iters=30", "--checkpoint_interval=10", "--learning_rate=2e-3"]


# --- rewinds -------------------------------------------------------------------------------------------------------

class Crash(BaseException):
    """A kill's stand-in, raised in place of one file operation: no `except Exception` catches it, so the run stops
    there, its later operations undone. Unlike a kill, the run's cleanup (closing its files, the lock) still runs;
    it writes nothing."""


def instrument_rewind(monkeypatch, fail_at=None):
    """Log each file operation of housekeeping.rewind (its os.makedirs and os.replace calls, the replaces of write_whole
    included) into the returned list; the operation number fail_at (1 is the first) raises Crash instead."""
    calls, inside = [], [False]
    real_rewind = housekeeping.rewind

    def operation(name):
        real = getattr(os, name)

        def wrapper(*args, **kwargs):
            if inside[0]:
                calls.append((name, os.path.basename(str(args[0]))))
                if len(calls) == fail_at:
                    raise Crash(f"crashed at {name} {args[0]}")
            return real(*args, **kwargs)
        return wrapper

    def rewind(*args):
        inside[0] = True
        try:
            return real_rewind(*args)
        finally:
            inside[0] = False

    for name in ("makedirs", "replace"):
        monkeypatch.setattr(os, name, operation(name))
    monkeypatch.setattr(housekeeping, "rewind", rewind)
    return calls


def test_a_rewind_crashed_at_any_moment_loses_nothing_and_a_rerun_completes_it(tmp_path, dataset, at_step_30,
                                                                                monkeypatch):
    """A rewind to step 10 of a run at step 30, made to crash at each of its file operations in turn (a Crash
    stands in for a kill; see Crash), then rerun as it was: whatever the moment, the abandoned timeline's
    checkpoints and metrics lines are all in abandoned-* folders, and the rerun computes what an unbroken rewind
    does, with none of the abandoned lines in the live metrics.jsonl."""
    original = contents(at_step_30)
    abandoned_lines = [line for line in lines(at_step_30 / "metrics.jsonl") if step_of(line) > 10]
    kept_lines = [line for line in lines(at_step_30 / "metrics.jsonl") if step_of(line) <= 10]
    assert abandoned_lines and kept_lines
    reference = tmp_path / "reference"
    shutil.copytree(at_step_30, reference)
    with monkeypatch.context() as m:
        operations = instrument_rewind(m)
        run(reference, dataset, *REWIND)
    # today: the abandoned folder, its metrics, the two checkpoints' moves, the live metrics; each is crashed at below
    assert {("replace", "ckpt_0000020.pt"), ("replace", "ckpt_0000030.pt")} <= set(operations), operations
    for k in range(1, len(operations) + 1):
        out = tmp_path / f"crash-at-{k}"
        shutil.copytree(at_step_30, out)
        with monkeypatch.context() as m:
            instrument_rewind(m, fail_at=k)
            with pytest.raises(Crash):
                run(out, dataset, *REWIND)
        run(out, dataset, *REWIND)
        where = f"crashed at operation {k} ({operations[k - 1]})"
        assert_identical(state_at(reference, 30), state_at(out, 30))
        assert checkpoint.list_steps(str(out)) == [10, 20, 30], where
        folders = abandoned_folders(out)
        kept_aside = {line for f in folders if os.path.exists(os.path.join(f, "metrics.jsonl"))
                      for line in lines(os.path.join(f, "metrics.jsonl"))}
        assert set(abandoned_lines) <= kept_aside, where
        for step in (20, 30):
            name = os.path.basename(checkpoint.path_for(str(out), step))
            assert any(open(os.path.join(f, name), "rb").read() == original[name]
                       for f in folders if os.path.exists(os.path.join(f, name))), (where, name)
        live = lines(out / "metrics.jsonl")
        assert not set(abandoned_lines) & set(live), where
        assert live[:len(kept_lines)] == kept_lines, where
        assert records(out / "metrics.jsonl") == records(reference / "metrics.jsonl"), where
        assert not [n for n in listing(out) if n.endswith(".tmp")], (where, listing(out))


def test_a_signal_during_start_up_is_handled_like_one_in_the_loop(tmp_path, dataset, at_step_30, monkeypatch,
                                                                   capsys):
    """SIGTERM arrives mid-rewind (a wrapper of housekeeping.rewind sends it to this process, then rewinds): the rewind
    completes, the run trains one step, saves it, and returns normally, saying it was stopped by a signal."""
    original = contents(at_step_30)
    abandoned_lines = [line for line in lines(at_step_30 / "metrics.jsonl") if step_of(line) > 10]
    unbroken = tmp_path / "unbroken"
    shutil.copytree(at_step_30, unbroken)
    run(unbroken, dataset, *REWIND, "--max_iters=11")
    real_rewind, signalled = housekeeping.rewind, []

    def rewind(out_dir, step):
        os.kill(os.getpid(), signal.SIGTERM)
        signalled.append(step)
        return real_rewind(out_dir, step)

    monkeypatch.setattr(housekeeping, "rewind", rewind)
    capsys.readouterr()
    run(at_step_30, dataset, *REWIND)
    printed = capsys.readouterr().out
    assert signalled == [10]
    assert "stopped by a signal after step 11" in printed, printed
    (folder,) = abandoned_folders(at_step_30)
    assert contents(folder) == {"ckpt_0000020.pt": original["ckpt_0000020.pt"],
                                "ckpt_0000030.pt": original["ckpt_0000030.pt"],
                                "metrics.jsonl": b"".join(abandoned_lines)}
    assert checkpoint.list_steps(str(at_step_30)) == [10, 11]
    assert_identical(state_at(unbroken, 11), state_at(at_step_30, 11))
    assert max(step_of(line) for line in lines(at_step_30 / "metrics.jsonl")) == 11


# --- leftovers -----------------------------------------------------------------------------------------------------

def test_leftovers_of_every_kind_are_cleaned_at_the_next_start(tmp_path, dataset):
    """Half-written metrics and checkpoints, a rewind's folder never filled or holding only a half-written
    metrics file: gone after a resume. A rewind's folder with a whole metrics.jsonl stays, as it was."""
    out = tmp_path / "out"
    run(out, dataset, "--max_iters=10", "--checkpoint_interval=5")
    leftovers = [out / "metrics.jsonl.tmp", out / "ckpt_0000099.pt.tmp", out / "abandoned-20200101-000000",
                 out / "abandoned-x"]
    (out / "metrics.jsonl.tmp").write_bytes(b'{"step": 3, "ti')
    (out / "ckpt_0000099.pt.tmp").write_bytes(open(checkpoint.path_for(str(out), 5), "rb").read()[:1000])
    (out / "abandoned-20200101-000000").mkdir()
    (out / "abandoned-x").mkdir()
    (out / "abandoned-x" / "metrics.jsonl.tmp").write_bytes(b'{"step": 7}\n')
    history = out / "abandoned-20190101-000000"
    history.mkdir()
    (history / "metrics.jsonl").write_bytes(b'{"step": 7, "loss": 1.0}\n')
    (history / "metrics.jsonl.tmp").write_bytes(b'{"step": 7, "lo')  # a second rewind's, cut short
    run(out, dataset, "--max_iters=15", "--checkpoint_interval=5")
    assert [p.name for p in leftovers if os.path.lexists(p)] == []
    assert contents(history) == {"metrics.jsonl": b'{"step": 7, "loss": 1.0}\n'}
    assert checkpoint.list_steps(str(out)) == [5, 10, 15]


# --- wandb ---------------------------------------------------------------------------------------------------------

def test_wandb_failing_to_start_changes_nothing_on_disk(tmp_path, dataset, at_step_30, monkeypatch):
    """A rewind with wandb_log=True whose wandb.init fails: one ConfigError, and out_dir as it was, to every file's
    bytes (train.lock aside: a run rewrites its holder's line when it locks the folder to check the resume, as
    conftest.py's files_and_mtimes allows); a fresh out_dir is not even made."""
    wandb = pytest.importorskip("wandb")
    for key, value in (("WANDB_MODE", "offline"), ("WANDB_DIR", str(tmp_path)), ("WANDB_SILENT", "true")):
        monkeypatch.setenv(key, value)

    def init(*args, **kwargs):
        raise RuntimeError("no network\nat all")

    monkeypatch.setattr(wandb, "init", init)
    before, files = listing(at_step_30), contents(at_step_30)
    message = "wandb_log=True, but wandb cannot start: RuntimeError: no network at all; try WANDB_MODE=offline"
    with pytest.raises(ConfigError) as e:
        run(at_step_30, dataset, "--from_checkpoint_step=10", "--wandb_log=True")
    assert str(e.value) == message
    assert listing(at_step_30) == before
    after = contents(at_step_30)
    assert [k for k in files if k != housekeeping.LOCK_NAME and after[k] != files[k]] == []
    fresh = tmp_path / "fresh"
    with pytest.raises(ConfigError, match="wandb cannot start"):
        run(fresh, dataset, "--max_iters=5", "--wandb_log=True")
    assert not os.path.lexists(fresh)


# --- the start line comes once nothing can fail on bad input -------------------------------------------------------

def test_no_error_comes_after_the_line_that_says_where_the_run_starts(tmp_path, dataset, capsys):
    run(tmp_path / "run", dataset, "--max_iters=2")
    capsys.readouterr()
    cases = [  # (out_dir, flags): each fails after resolve_start has chosen the step
        ("fresh", ["--n_embd=30", "--n_head=4"]),
        ("fresh", ["--warmup_iters=50", "--lr_decay_iters=10"]),
        ("fresh", ["--vocab_size=3"]),
        ("fresh", [f"--init_from={tmp_path / 'nothing here'}"]),
        ("run", ["--dataset=no_such_dataset"]),
        ("run", ["--max_iters=4", "--dropout=1.5"]),
    ]
    for folder, flags in cases:
        with pytest.raises((ConfigError, checkpoint.CheckpointError)):
            train.main(TINY + [f"--dataset={dataset}", f"--out_dir={tmp_path / folder}", *flags])
        out = capsys.readouterr().out
        assert "starting fresh" not in out and "resuming from" not in out, (flags, out)
