"""
A failed write harms nothing: disk full or permission denied stops the run with one line and exit code 2, the
temporary file removed and every earlier checkpoint intact; temporary leftovers are ignored and cleaned up.
    python3 -m pytest -q -n 2 test_failed_writes.py
"""
import errno
import os
import re
import subprocess

import pytest

import checkpoint
from conftest import HERE, run, train_cmd


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


def test_temporary_leftovers_are_ignored_and_cleaned_up(tmp_path, dataset):
    run(tmp_path, dataset, "--max_iters=5")
    leftover = tmp_path / "ckpt_0000010.pt.tmp"
    leftover.write_bytes(open(checkpoint.path_for(str(tmp_path), 5), "rb").read()[:1000])
    assert checkpoint.list_steps(str(tmp_path)) == [5]
    run(tmp_path, dataset, "--max_iters=10")
    assert not leftover.exists() and checkpoint.list_steps(str(tmp_path)) == [5, 10]
