"""
A failing disk is one line: strace's fault injection (EIO, a full disk) at a call that lists, reads or writes a
run's out_dir, in each kind of script; each ends with one line on stderr, `error: ...` naming the file and what
failed, exit 2, and the checkpoints written before intact. A few representative points of the sweep that placed
a fault at every such call (of openat, read, write, fsync, rename, unlink, mkdir, getdents64, flock, close and
stat, at a fresh start, a resume, a save, a rewind, retention and in every script); skipped without strace, or
where it may not trace (ptrace refused).
"""
import glob
import hashlib
import os
import shutil
import subprocess
import sys

import pytest

from conftest import HERE, TINY, run

STRACE = shutil.which("strace")


def strace_works():
    return STRACE is not None and subprocess.run([STRACE, "-f", "-qq", "-o", os.devnull, "true"]).returncode == 0


pytestmark = pytest.mark.skipif(not strace_works(), reason="needs strace, allowed to trace (ptrace)")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, dataset):
    """A run to step 4, a checkpoint at steps 2 and 4: each test faults a copy of it."""
    out = tmp_path_factory.mktemp("faults") / "out"
    run(out, dataset, "--max_iters=4", "--checkpoint_interval=2")
    return out


def checkpoints(out):
    return {os.path.basename(p): hashlib.sha256(open(p, "rb").read()).hexdigest()
            for p in glob.glob(os.path.join(out, "ckpt_*.pt"))}


def faulted(args, path, *injections):
    """`python args...` under strace, each injection ("write:error=ENOSPC:when=1") made in calls on `path` alone."""
    syscalls = ",".join(i.split(":")[0] for i in injections)
    cmd = [STRACE, "-f", "-qq", "-o", os.devnull, "-P", str(path), "-e", f"trace={syscalls}"]
    for injection in injections:
        cmd += ["-e", f"inject={injection}"]
    return subprocess.run(cmd + [sys.executable, *args], cwd=HERE, capture_output=True, text=True, timeout=300)


def assert_one_line(done, *facts):
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    for fact in facts:
        assert fact in done.stderr


def train_args(dataset, out, *flags):
    return ["train.py", *TINY, f"--dataset={dataset}", f"--out_dir={out}", "--checkpoint_interval=2", *flags]


def test_a_resume_that_cannot_list_out_dir_is_one_line(tmp_path, dataset, finished_run):
    """The listing that chooses the step to resume: once a traceback; never a fresh start (no checkpoints!)."""
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    before = checkpoints(out)
    done = faulted(train_args(dataset, out, "--max_iters=6"), out, "openat:error=EIO:when=1")
    assert_one_line(done, f"cannot list {out}: Input/output error")
    assert checkpoints(out) == before


def test_a_save_on_a_full_disk_is_one_line_even_when_its_temporary_file_cannot_be_deleted(tmp_path, dataset,
                                                                                         finished_run):
    """The first write of step 6's file fails, and so does deleting it (once a traceback): the first error is
    said, the earlier checkpoints are intact, and the next start deletes the temporary file."""
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    before = checkpoints(out)
    tmp = out / "ckpt_0000006.pt.tmp"
    done = faulted(train_args(dataset, out, "--max_iters=6"), tmp, "write:error=ENOSPC:when=1",
                   "unlink:error=EIO:when=1")
    assert_one_line(done, f"cannot write checkpoint {tmp}: No space left on device")
    assert checkpoints(out) == before


@pytest.mark.parametrize("injection, said", [("read:error=EIO:when=1", "Input/output error"),
                                              ("mmap:error=ENOMEM:when=2", "Cannot allocate memory")])
def test_a_checkpoint_the_system_cannot_read_is_not_taken_for_damage(tmp_path, dataset, finished_run, injection,
                                                                     said):
    """zipfile calls a failed read no zip file, torch's C++ says it in words of its own: once, the newest step was
    taken for damaged, an older one resumed and the newest set aside. A read error is one line; nothing moves."""
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    newest = out / "ckpt_0000004.pt"
    done = faulted(train_args(dataset, out, "--max_iters=6"), newest, injection)
    assert_one_line(done, f"cannot read checkpoint {newest}: {said}")
    assert sorted(os.listdir(out)) == ["ckpt_0000002.pt", "ckpt_0000004.pt", "metrics.jsonl", "train.lock"]


def test_a_script_that_cannot_list_out_dir_is_one_line(tmp_path, finished_run):
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    done = faulted(["sample.py", f"--out_dir={out}", "--num_samples=1", "--max_new_tokens=2", "--device=cpu"], out,
                   "getdents64:error=EIO:when=1")
    assert_one_line(done, f"cannot list {out}: Input/output error")


def test_plot_that_cannot_read_the_metrics_is_one_line(tmp_path, finished_run):
    metrics = finished_run / "metrics.jsonl"
    done = faulted(["plot.py", str(finished_run), f"--output={tmp_path}/loss.png"], metrics, "read:error=EIO:when=1")
    assert_one_line(done, f"cannot read {metrics}: Input/output error")
