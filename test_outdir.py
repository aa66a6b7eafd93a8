"""
outdir.py's promises about a run's folder, on tiny models on the CPU:  python3 -m pytest -q -n 2 test_outdir.py
- one folder, one run: a live run whose out_dir (or its train.lock) is deleted or replaced stops, exit code 2,
  one line on stderr, and writes or prunes nothing in the folder made anew (outdir.Guard; real processes), even
  when the folder is replaced between a save's rename and the guard after it (saver.publish, in-process);
- the nodes of one job must be given one command: two torchrun launchers given other max_iters and seed stop,
  naming both keys, before anything is written (outdir.resolve_start; real processes);
- a rewind crashed after any of its file operations loses nothing, and a rerun completes it exactly (outdir.rewind);
- a signal during start-up (here: mid-rewind) is handled as one in the loop: the rewind completes, one step is
  trained and saved, the run ends cleanly;
- every kind of leftover a crash leaves is cleaned at the next start, and nothing that holds history
  (outdir.clean_leftovers);
- wandb failing to start changes nothing on disk, not even a fresh out_dir's creation (outdir.open_out_dir).
"""
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import time

import pytest
import torch

import checkpoint
import outdir
import saver
from configurator import ConfigError
import test_train
from test_train import (HERE, assert_identical, ddp_flags, free_port, kill_all, process_tree, run, state_at,
                        torchrun_cmd, train_cmd, wait_for_line)

# As in test_train.py: one thread per process, here and in the processes the tests start (they inherit it).
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"

dataset = test_train.dataset  # the fixture, shared: tests ask for it by name

TIMING = ("time", "ms_per_step", "tokens_per_s", "mfu")  # what differs between two runs computing the same steps


def lines(path):
    with open(path, "rb") as f:
        return f.readlines()


def step_of(line):
    return json.loads(line)["step"]


def records(path):
    """metrics.jsonl's entries without their timings: what two runs computing the same steps have alike."""
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines(path)]


def contents(folder):
    """Every file below folder, by relative path, with its bytes."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def listing(folder):
    """Every file and folder below folder, by relative path."""
    return sorted(os.path.relpath(os.path.join(root, n), folder)
                  for root, dirs, names in os.walk(folder) for n in dirs + names)


def abandoned_folders(out_dir):
    return sorted(glob.glob(os.path.join(str(out_dir), "abandoned-*")))


@pytest.fixture
def at_step_30(tmp_path, dataset):
    """A run to step 30 with checkpoints 10, 20, 30 and its metrics.jsonl, at learning_rate 5e-3: the timeline a
    rewind to step 10 (at another rate) abandons."""
    base = tmp_path / "base"
    run(base, dataset, "--max_iters=30", "--checkpoint_interval=10", "--learning_rate=5e-3")
    assert checkpoint.list_steps(str(base)) == [10, 20, 30] and os.path.exists(base / "metrics.jsonl")
    return base


REWIND = ["--from_checkpoint_step=10", "--max_iters=30", "--checkpoint_interval=10", "--learning_rate=2e-3"]


# --- one folder, one run ---------------------------------------------------------------------------------------

def start_apart(cmd):
    """A process whose stdout is read by lines, and whose stderr is kept apart."""
    return subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def stopped(pid):
    """Whether every thread of pid is stopped (SIGSTOP takes effect asynchronously)."""
    tasks = os.listdir(f"/proc/{pid}/task")
    return all(open(f"/proc/{pid}/task/{t}/stat").read().rsplit(")", 1)[1].split()[0] in "Tt" for t in tasks)


def pause_between_saves(proc, out):
    """SIGSTOP proc at a moment when no checkpoint of its is half-written in out: a save in flight would fail of
    its own when its folder goes, and so hide whether the guard works."""
    deadline = time.monotonic() + 10
    while True:
        assert time.monotonic() < deadline, f"never a moment without a checkpoint being written in {out}"
        os.kill(proc.pid, signal.SIGSTOP)
        while not stopped(proc.pid):
            pass
        if not [n for n in os.listdir(out) if n.endswith(".tmp")]:
            return
        os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.002)


@pytest.mark.parametrize("deleted", ["out_dir", "train.lock"])
def test_a_run_whose_folder_is_deleted_stops_and_writes_nothing_in_the_new_one(tmp_path, dataset, deleted):
    """A live process, saving every step, is paused between two saves (SIGSTOP) and its out_dir deleted and made
    anew with another run's file in it (named like a checkpoint, so that retention would prune it, were this
    the run's folder); or its train.lock alone is deleted. Let go on (SIGCONT), it must stop at its next write:
    exit code 2 within 20 s, one line on stderr naming the folder, and the new folder left as it was made (for
    train.lock: no checkpoint saved after the deletion)."""
    out = tmp_path / "out"
    keep = "--keep_last_checkpoints=1" if deleted == "out_dir" else "--keep_last_checkpoints=0"
    proc = start_apart(train_cmd(dataset, out, "--checkpoint_interval=1", "--max_iters=100000", keep))
    try:
        seen = wait_for_line(proc, "step 5:")
        pause_between_saves(proc, out)
        if deleted == "out_dir":
            shutil.rmtree(out)
            out.mkdir()
            (out / "ckpt_0000001.pt").write_bytes(b"another run's file\n")
        else:
            os.remove(out / outdir.LOCK_NAME)
        before = checkpoint.list_steps(str(out))
        os.kill(proc.pid, signal.SIGCONT)
        try:
            rest, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the run went on after its {deleted} was deleted:\n{seen[-2000:]}")
    finally:
        if proc.poll() is None:
            kill_all(process_tree(proc.pid))
            proc.communicate()
    assert proc.returncode == 2, (seen + rest)[-3000:] + err
    assert len(err.splitlines()) == 1 and err.startswith(f"error: out_dir {out} is no longer the folder this run "
                                                         f"locked (it, or its train.lock, was deleted"), err
    assert checkpoint.list_steps(str(out)) == before, "a checkpoint was saved after the deletion"
    if deleted == "out_dir":
        assert contents(out) == {"ckpt_0000001.pt": b"another run's file\n"}
    else:
        assert not os.path.exists(out / outdir.LOCK_NAME)


@pytest.mark.parametrize("made_anew", ["empty", "with-a-file-of-that-name"])
def test_a_folder_replaced_just_after_a_save_is_left_as_it_was_made(tmp_path, monkeypatch, made_anew):
    """The moment between a save's rename and the guard after it, too brief to hit from outside (the test above
    hits it now and then): out_dir is moved away and made anew, empty or holding another run's file named as the
    checkpoint just saved. The save must fail with the guard's error, the new folder stay as it was made, and the
    checkpoint stay where it was written."""
    out, old = tmp_path / "out", tmp_path / "old"
    out.mkdir()
    theirs = {"ckpt_0000005.pt": b"another run's file\n"} if made_anew != "empty" else {}
    real_save = checkpoint.save

    def save_then_replace(*args, **kwargs):
        path = real_save(*args, **kwargs)
        os.rename(out, old)
        out.mkdir()
        for name, data in theirs.items():
            (out / name).write_bytes(data)
        return path

    monkeypatch.setattr(checkpoint, "save", save_then_replace)
    with outdir.lock(str(out)) as held:
        with pytest.raises(checkpoint.CheckpointError, match="is no longer the folder this run locked"):
            saver.publish(str(out), 5, {"w": torch.zeros(2)}, 1, 0, [0], guard=outdir.Guard(str(out), held))
    assert contents(out) == theirs
    assert checkpoint.list_steps(str(old)) == [5]


# --- one job, one command ----------------------------------------------------------------------------------------

def test_the_nodes_of_one_job_must_be_given_one_command(tmp_path, dataset):
    """Two torchrun launchers on 127.0.0.1 stand for two machines, one rank each; node 1 is given another max_iters
    (its ranks would wait for steps rank 0 never takes) and another seed (two runs trained as one). The job must
    stop at start-up, naming both keys in one line, and write nothing: out_dir is never made."""
    out, port = tmp_path / "out", free_port()
    nodes = [start_apart(torchrun_cmd(1, *ddp_flags(dataset, out, *extra), nodes=(rank, port)))
             for rank, extra in ((0, ["--max_iters=20"]), (1, ["--max_iters=30", "--seed=7"]))]
    outputs = []
    try:
        for p in nodes:
            try:
                outputs.append(p.communicate(timeout=60))
            except subprocess.TimeoutExpired:
                pytest.fail("the job hung instead of refusing two configs")
    finally:
        for p in nodes:
            if p.poll() is None:
                kill_all(process_tree(p.pid))
                p.communicate()
    printed = "\n".join(o + e for o, e in outputs)
    # torchrun itself exits 1 when a worker fails; each reports its worker's own exit code, the config error's 2
    assert all(p.returncode != 0 for p in nodes), printed[-4000:]
    assert all(re.search(r"exitcode\s*: 2 ", o + e) for o, e in outputs), printed[-4000:]
    errors = [line for line in printed.splitlines()
              if line.startswith("error: the ranks of this job were given different configs")]
    assert len(errors) == 1, printed[-4000:]  # rank 0 alone says it
    assert "max_iters, seed differ between rank 0 and rank 1" in errors[0], errors[0]
    assert not os.path.exists(out), listing(out)


# --- rewinds ---------------------------------------------------------------------------------------------------

class Crash(BaseException):
    """A kill's stand-in, raised in place of one file operation: no `except Exception` catches it, so the run stops
    there, its later operations undone. Unlike a kill, the run's cleanup (closing its files, the lock) still runs;
    it writes nothing."""


def instrument_rewind(monkeypatch, fail_at=None):
    """Log each file operation of outdir.rewind (its os.makedirs and os.replace calls, the replaces of write_whole
    included) into the returned list; the operation number fail_at (1 is the first) raises Crash instead."""
    calls, inside = [], [False]
    real_rewind = outdir.rewind

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
    monkeypatch.setattr(outdir, "rewind", rewind)
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
    """SIGTERM arrives mid-rewind (a wrapper of outdir.rewind sends it to this process, then rewinds): the rewind
    completes, the run trains one step, saves it, and returns normally, saying it was stopped by a signal."""
    original = contents(at_step_30)
    abandoned_lines = [line for line in lines(at_step_30 / "metrics.jsonl") if step_of(line) > 10]
    unbroken = tmp_path / "unbroken"
    shutil.copytree(at_step_30, unbroken)
    run(unbroken, dataset, *REWIND, "--max_iters=11")
    real_rewind, signalled = outdir.rewind, []

    def rewind(out_dir, step):
        os.kill(os.getpid(), signal.SIGTERM)
        signalled.append(step)
        return real_rewind(out_dir, step)

    monkeypatch.setattr(outdir, "rewind", rewind)
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


# --- leftovers -------------------------------------------------------------------------------------------------

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


# --- wandb -----------------------------------------------------------------------------------------------------

def test_wandb_failing_to_start_changes_nothing_on_disk(tmp_path, dataset, at_step_30, monkeypatch):
    """A rewind with wandb_log=True whose wandb.init fails: one ConfigError, and out_dir as it was, to every file's
    bytes (train.lock aside: a run rewrites its holder's line when it locks the folder to check the resume, as
    test_train.py's files_and_mtimes allows); a fresh out_dir is not even made."""
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
    assert [k for k in files if k != outdir.LOCK_NAME and after[k] != files[k]] == []
    fresh = tmp_path / "fresh"
    with pytest.raises(ConfigError, match="wandb cannot start"):
        run(fresh, dataset, "--max_iters=5", "--wandb_log=True")
    assert not os.path.lexists(fresh)
