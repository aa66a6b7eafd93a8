"""
Sharded runs (fsdp=True, FSDP2) and their checkpoint folders, on tiny models on the CPU with gloo, 2 ranks:
- FSDP2 on 2 ranks computes the unsharded run bit for bit (the layout-exact gradient norm makes clipping agree),
  and DDP's with 2 micro-batches a rank;
- a folder reads whole on one process as the file of the same step would (checkpoint.load), and converts to one;
- resumes cross layouts exactly: 2 -> 1 (after a rewind, which sets a folder aside whole), a file -> 2 sharded
  (1 -> 2, DDP -> FSDP), 2 -> 2 from a folder, sharded -> DDP; each step torch.equal to the unsharded run;
- a damaged, lost or added shard, a run.pt without checksums, a .metadata that would unpickle anything: refused,
  and the newest good step resumed; retention deletes folders whole;
- a signal to one rank stops every rank after the same step and saves its folder; kill -9 at random moments and mid-save
  loses nothing (a folder with a final name is complete), and the rerun computes the same weights.
"""
import concurrent.futures
import glob
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading

import pytest
import torch

import checkpoint
import sample
import saver
import sharded
from configurator import ConfigError
from conftest import (HERE, TINY, assert_identical, kill_9_again_and_again, run, stop_by_signal, torchrun_cmd,
                      train_2_ranks, worker_with_rank)


# the tests that read the sharded run's folders run on one xdist worker (--dist loadgroup): it is made once
ONE_WORKER = pytest.mark.xdist_group("sharded_run")


def fsdp_cmd(dataset, out, *flags):
    return torchrun_cmd(2, *TINY, f"--dataset={dataset}", f"--out_dir={out}", *flags)


def load(out, step):
    return checkpoint.load(checkpoint.path_for(str(out), step))


@ONE_WORKER
def test_sharded_runs_resume_exactly_across_layouts(tmp_path, dataset, sharded_run, ddp_reference):
    out = tmp_path / "out"
    shutil.copytree(sharded_run, out)
    for step in (4, 6):  # 1 -> 2 (DDP -> FSDP): the fixture's run
        assert sorted(os.listdir(checkpoint.path_for(str(out), step))) == [
            ".metadata", "__0_0.distcp", "__1_0.distcp", "run.pt"]
        assert_identical(load(ddp_reference, step), load(out, step))
    converted = tmp_path / "whole.pt"
    done = subprocess.run([sys.executable, "checkpoint.py", checkpoint.path_for(str(out), 6), str(converted)],
                          cwd=HERE, capture_output=True, text=True)
    assert done.returncode == 0 and "wrote" in done.stdout, done.stderr
    assert_identical(load(ddp_reference, 6), torch.load(converted, weights_only=True))

    run(out, dataset, "--from_checkpoint_step=4", "--max_iters=6", "--checkpoint_interval=2")  # 2 -> 1, a rewind
    (abandoned,) = glob.glob(str(out / "abandoned-*"))
    assert_identical(load(ddp_reference, 6), load(abandoned, 6))  # the folder it set aside, whole
    assert os.path.isfile(checkpoint.path_for(str(out), 6))
    assert_identical(load(ddp_reference, 6), load(out, 6))
    train_2_ranks(dataset, out, "--from_checkpoint_step=4", "--max_iters=8")  # a 2-rank folder -> 2 ranks sharded
    assert os.path.isdir(checkpoint.path_for(str(out), 8))
    assert "fsdp: True -> False" in train_2_ranks(dataset, out, "--fsdp=False", "--max_iters=10")  # a folder -> DDP
    assert os.path.isfile(checkpoint.path_for(str(out), 10))
    for step in (6, 8, 10):
        assert_identical(load(ddp_reference, step), load(out, step))


def test_sharded_equals_ddp_with_two_micro_batches_a_rank(tmp_path, dataset):
    """Gradients are reduced once a step, after a rank's last micro-batch, under FSDP2 as under DDP. (Against one
    process the sum's order differs: ((a + b) + c) + d there, (a + b) + (c + d) on 2 ranks.)"""
    for how in ("--fsdp=False", "--fsdp=True"):
        train_2_ranks(dataset, tmp_path / how, how, "--gradient_accumulation_steps=4", "--max_iters=2")
    assert_identical(load(tmp_path / "--fsdp=False", 2), load(tmp_path / "--fsdp=True", 2))


@ONE_WORKER
def test_a_damaged_folder_is_refused_and_an_older_step_resumed(tmp_path, sharded_run, capsys):
    def spoilt(how):
        out = tmp_path / how
        shutil.copytree(sharded_run, out)
        folder = checkpoint.path_for(str(out), 6)
        if how == "bit flipped":
            with open(os.path.join(folder, "__1_0.distcp"), "r+b") as f:
                f.seek(100)
                byte = f.read(1)
                f.seek(100)
                f.write(bytes([byte[0] ^ 1]))
        elif how == "shard lost":
            os.remove(os.path.join(folder, "__0_0.distcp"))
        elif how == "file added":
            open(os.path.join(folder, "__2_0.distcp"), "wb").close()
        elif how == "no checksums":
            info = torch.load(os.path.join(folder, "run.pt"), weights_only=True)
            del info["checksums"]
            torch.save(info, os.path.join(folder, "run.pt"))
        elif how == "run.pt cut short":
            os.truncate(os.path.join(folder, "run.pt"), 1000)
        return out, folder

    for how, problem in (("bit flipped", "checksum mismatch in __1_0.distcp"),
                         ("shard lost", "missing __0_0.distcp"), ("file added", "unlisted __2_0.distcp"),
                         ("no checksums", "run.pt records no checksums"), ("run.pt cut short", "not a whole zip")):
        out, folder = spoilt(how)
        with pytest.raises(checkpoint.CheckpointError, match=problem):
            checkpoint.load(folder)
        step, state = checkpoint.find(str(out), -1)
        assert step == 4 and "trying an older one" in capsys.readouterr().out
        assert not checkpoint.describe(str(out))[1]

    class Exploit:  # what a hostile .metadata could carry: unpickling it would run os.system
        def __reduce__(self):
            return os.system, ("echo pwned",)

    out, folder = spoilt("hostile metadata")
    with open(os.path.join(folder, ".metadata"), "wb") as f:
        pickle.dump(Exploit(), f)
    with pytest.raises(pickle.UnpicklingError, match="is no part of DCP's metadata"):
        sharded.SafeReader(folder).read_metadata()


@ONE_WORKER
def test_a_folder_missing_a_rank_s_shards_is_never_published(tmp_path, sharded_run):
    """On two machines whose out_dirs are not one filesystem, rank 0 sees none of the other's files."""
    out = tmp_path / "out"
    shutil.copytree(sharded_run, out)
    tmp = checkpoint.path_for(str(out), 8, folder=True) + checkpoint.TMP_SUFFIX
    shutil.copytree(checkpoint.path_for(str(out), 6), tmp)
    os.remove(os.path.join(tmp, "__1_0.distcp"))
    written = concurrent.futures.Future()
    written.set_result(None)
    info = {k: v for k, v in load(out, 6).items() if k not in ("model", "optimizer")} | {"step": 8}
    with pytest.raises(checkpoint.CheckpointError, match="lacks __1_0.distcp: .* one filesystem that every machine"):
        saver.publish_folder(str(out), 8, written, info, 0, 0, [], threading.Event(), lambda: None)
    assert checkpoint.list_steps(str(out)) == [2, 4, 6]


@ONE_WORKER
def test_sample_py_reads_a_sharded_run_unchanged(sharded_run, capsys):
    sample.main([f"--out_dir={sharded_run}", "--start=def ", "--num_samples=1", "--max_new_tokens=20", "--device=cpu"])
    printed = capsys.readouterr()
    assert printed.out.startswith("def ") and os.path.join(str(sharded_run), "ckpt_0000006") in printed.err


@ONE_WORKER
def test_retention_deletes_folders_whole(tmp_path, sharded_run):
    out = tmp_path / "out"
    shutil.copytree(sharded_run, out)
    assert checkpoint.prune(str(out), 1, 0) == [2, 4]
    assert checkpoint.list_steps(str(out)) == [6] and sorted(os.listdir(out)) == [
        "ckpt_0000006", "metrics.jsonl", "train.lock"]


def test_a_sharded_run_stops_on_a_signal_and_survives_kill_9(tmp_path, dataset, ddp_reference):
    out = tmp_path / "out"
    cmd = fsdp_cmd(dataset, out, "--fsdp=True", "--max_iters=40")
    # only rank 1 hears it: rank 0 must stop after the same step, or the folder would never be complete
    code, output, stopped = stop_by_signal(cmd, out, lambda p: os.kill(worker_with_rank(p.pid, 1), signal.SIGUSR1))
    assert code == 0 and os.path.isdir(checkpoint.path_for(str(out), stopped)), output
    assert kill_9_again_and_again(cmd + ["--checkpoint_interval=1"], 1, 1, out) >= 1
    assert checkpoint.describe(str(out))[1]  # every folder with a final name is whole
    run(out, dataset, "--max_iters=40", "--checkpoint_interval=1")
    assert_identical(load(ddp_reference, 40), load(out, 40))


def test_float16_is_refused_sharded():
    """GradScaler would find an inf in one rank's shard of the gradient alone, and the ranks would skip apart."""
    with pytest.raises(ConfigError, match="fsdp=True needs dtype bfloat16 or float32"):
        sharded.shard(None, None, "cuda", "float16")
