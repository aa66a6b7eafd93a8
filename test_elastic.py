"""
Elastic restarts and clean exits under torchrun, with real processes and tiny models on the CPU: a worker killed
by kill -9 comes back by torchrun --max-restarts alone and the job ends as an unbroken run would, and a run that
finished is never reported failed.
"""
import os
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta

import torch.distributed as dist

import checkpoint
import device
from conftest import HERE, TINY, assert_identical, run, worker_with_rank


def torchrun(*args, restarts=0):
    """A 2-rank job of train.py on loopback, whose output is read by lines."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           f"--max-restarts={restarts}", "train.py", *TINY, *args]
    return subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_each_start_of_a_job_gets_a_name_of_its_own_that_all_its_ranks_agree_on():
    """The second start finds the first one's keys in the store, as torchrun's restarted workers do: its rank 0,
    there first, reads the other ranks' old questions before they ask again, and must still name the start."""
    store, names = dist.HashStore(), []
    for others_late in (0.0, 0.3):
        got = {}

        def join(rank):
            time.sleep(others_late if rank else 0.0)
            got[rank] = device.name_this_start(store, rank, 3, timedelta(seconds=30))
        ranks = [threading.Thread(target=join, args=(rank,)) for rank in range(3)]
        for t in ranks:
            t.start()
        for t in ranks:
            t.join()
        assert len(got) == 3 and len(set(got.values())) == 1, got
        names.append(got[0])
    assert names[0] != names[1]


def test_a_restart_brings_a_killed_job_back_to_the_end_of_an_unbroken_run(tmp_path, dataset):
    """kill -9 rank 1 once a checkpoint exists: torchrun's one restart resumes the newest complete checkpoint on
    both ranks, with no environment variable set, and ends with the weights and AdamW state of an unbroken run
    (one process computes 2 ranks' steps bit for bit: each rank's micro-batch is one of its two)."""
    out, unbroken = tmp_path / "out", tmp_path / "unbroken"
    flags = ["--max_iters=100", "--checkpoint_interval=10"]
    with torchrun(*flags, f"--dataset={dataset}", f"--out_dir={out}", restarts=1) as proc:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("saved"):  # 90 steps to go: the kill lands mid-run
                os.kill(worker_with_rank(proc.pid, 1), signal.SIGKILL)
                break
        text = "".join(seen) + proc.stdout.read()
        assert proc.wait(timeout=120) == 0, text[-3000:]
    assert int(re.search(r"resuming from step (\d+)", text).group(1)) >= 10, text[-3000:]
    assert "Traceback" not in text and "lost the job's other ranks" in text, text[-3000:]  # one line, no gloo
    run(unbroken, dataset, *flags, "--gradient_accumulation_steps=2")
    assert_identical(*(checkpoint.load(checkpoint.path_for(str(d), 100)) for d in (out, unbroken)))


def test_two_failures_in_a_row_still_end_as_an_unbroken_run_and_each_is_one_line(tmp_path, dataset):
    """kill -9 rank 1 mid-run, then rank 1 of the restart while it starts up: with --max-restarts=2 the job
    still ends with the weights and AdamW state of an unbroken run, and each lost peer is said in one line, never a
    gloo traceback."""
    out = tmp_path / "out"
    unbroken = tmp_path / "unbroken"
    flags = ["--max_iters=60", "--checkpoint_interval=10"]
    kills = 0
    with torchrun(*flags, f"--dataset={dataset}", f"--out_dir={out}", restarts=2) as proc:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if kills == 0 and line.startswith("saved"):
                os.kill(worker_with_rank(proc.pid, 1), signal.SIGKILL)
                kills = 1
            elif kills == 1 and "lost the job's other ranks" in line:
                time.sleep(1.0)  # torchrun is starting the workers anew
                os.kill(worker_with_rank(proc.pid, 1), signal.SIGKILL)
                kills = 2
        assert proc.wait(timeout=180) == 0, "".join(seen)[-3000:]
    text = "".join(seen)
    assert kills == 2 and "Traceback" not in text and "GLHF" not in text, text[-3000:]
    assert re.search(r"error: rank 0 lost the job's other ranks \(", text), text[-3000:]
    run(unbroken, dataset, *flags, "--gradient_accumulation_steps=2")
    assert_identical(*(checkpoint.load(checkpoint.path_for(str(d), 60)) for d in (out, unbroken)))


def test_a_restart_resumes_the_newest_step_not_a_rewind_again(tmp_path, dataset, monkeypatch, capsys):
    """A restarted command that rewound (--from_checkpoint_step=2) must not rewind again: that would undo the
    steps trained since."""
    run(tmp_path, dataset, "--max_iters=4", "--checkpoint_interval=2")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # what torchrun sets in the workers it restarts
    capsys.readouterr()
    run(tmp_path, dataset, "--from_checkpoint_step=2", "--max_iters=6", "--checkpoint_interval=2")
    assert "resuming from step 4" in capsys.readouterr().out
    assert checkpoint.list_steps(str(tmp_path)) == [2, 4, 6] and not [n for n in os.listdir(tmp_path)
                                                                        if n.startswith("abandoned-")]


def test_finished_jobs_are_never_reported_failed(tmp_path, dataset):
    """Short 2-rank jobs, DDP and FSDP2, each exits 0. A gloo thread freeing a tensor as the interpreter finalized
    once aborted about one FSDP2 job in five (device.py's exit_cleanly says how); forced by holding that thread
    (an LD_PRELOAD shim, not part of the suite) it aborted every job, and with exit_cleanly none."""
    for jobs in range(2):
        with torchrun(f"--dataset={dataset}", f"--out_dir={tmp_path / str(jobs)}", "--max_iters=2",
                      "--checkpoint_interval=1", *(["--fsdp=True"] if jobs % 2 else [])) as proc:
            text = proc.stdout.read()
            assert proc.wait(timeout=120) == 0 and "done: trained to step 2" in text, text[-3000:]
