"""
One run per folder, one command per job:  python3 -m pytest -q -n 2 test_one_run_per_folder.py
- a second trainer on the same out_dir exits 2 at once, naming the host and pid that hold it; readers work meanwhile;
- a live run whose out_dir (or its train.lock) is deleted or replaced stops, exit code 2, one line on stderr, and
  writes or prunes nothing in the folder made anew (housekeeping.Guard; real processes), even when the folder is
  replaced between a save's rename and the guard after it (saver.publish, in-process);
- the nodes of one job must be given one command: two torchrun launchers given other max_iters and seed stop,
  naming both keys, before anything is written (outdir.Run.resume; real processes).
"""
import os
import re
import shutil
import signal
import socket
import subprocess
import time

import pytest
import torch

import checkpoint
import housekeeping
import sample
import saver
from conftest import (HERE, contents, ddp_flags, free_port, kill_all, listing, process_tree, run, start, torchrun_cmd,
                      train_cmd, wait_for_line)


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


# --- a folder deleted or replaced under a live run -----------------------------------------------------------------

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
            os.remove(out / housekeeping.LOCK_NAME)
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
        assert not os.path.exists(out / housekeeping.LOCK_NAME)


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
    with housekeeping.lock(str(out)) as held:
        with pytest.raises(checkpoint.CheckpointError, match="is no longer the folder this run locked"):
            saver.publish(str(out), 5, {"w": torch.zeros(2)}, 1, 0, [0], guard=housekeeping.Guard(str(out), held))
    assert contents(out) == theirs
    assert checkpoint.list_steps(str(old)) == [5]


# --- one job, one command ------------------------------------------------------------------------------------------

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
