"""
The checkpoint files: what they hold, that they prove their integrity, what happens to damaged ones, what retention
keeps, and checkpoint.py's listing:  python3 -m pytest -q -n 2 test_checkpoint_files.py
- one file per step, named for it, holding exactly the model's own names; valid zip files, every record checked by
  CRC32 so that a flipped bit or a truncation is caught;
- a damaged newest file is set aside with a warning and the newest good one resumed; a read error (EIO) or a file a
  live run pruned is not damage; a stray file named like a checkpoint is none; unusable files are said plainly;
- everything loads with weights_only=True: pickled code in a checkpoint never runs;
- retention keeps the newest few, milestones, the step resumed from and the best val loss.
"""
import errno
import glob
import os
import random
import re
import shutil
import subprocess

import pytest

import checkpoint
import sample
import train
from conftest import TINY, assert_identical, files_and_mtimes, read_metrics, run, run_process, state_at
from model import GPT, GPTConfig


def test_checkpoints_at_expected_steps_with_clean_names(tmp_path, dataset):
    run(tmp_path, dataset, "--max_iters=25", "--checkpoint_interval=10")
    assert checkpoint.list_steps(str(tmp_path)) == [10, 20, 25]
    assert sorted(os.listdir(tmp_path)) == ["ckpt_0000010.pt", "ckpt_0000020.pt", "ckpt_0000025.pt", "metrics.jsonl",
                                            "train.lock"]
    state = state_at(tmp_path, 25)
    assert state["step"] == 25 and state["config"]["max_iters"] == 25 and state["tokens_seen"] == 25 * 4 * 16
    assert not any(k.startswith(("module.", "_orig_mod.")) or "._orig_mod." in k for k in state["model"])
    model = GPT(GPTConfig(**state["model_args"]))
    model.load_state_dict(state["model"])  # strict: the names are exactly the model's own
    assert state["val_loss"] is not None and state["best_val_loss"] <= state["val_loss"]


def test_checkpoints_prove_their_integrity(tmp_path, dataset):
    """Any truncation, and any flipped bit in what a load reads, is detected; a flip elsewhere (a timestamp, the
    padding between records) changes nothing that loads."""
    import zipfile
    run(tmp_path, dataset, "--max_iters=5")
    path = checkpoint.path_for(str(tmp_path), 5)
    data, good = open(path, "rb").read(), checkpoint.load(path)
    with zipfile.ZipFile(path) as z:  # where each record's data lies: after its 30-byte header, name and extra field
        records = [(r.header_offset + 30 + int.from_bytes(data[r.header_offset + 26:r.header_offset + 28], "little")
                    + int.from_bytes(data[r.header_offset + 28:r.header_offset + 30], "little"), r.file_size)
                   for r in z.infolist()]
    damaged = str(tmp_path / "damaged.pt")
    first_data = min(start for start, _ in records)
    rng = random.Random(0)  # anywhere, and more densely in the headers and the zip directory at the end
    positions = sorted(set(rng.sample(range(len(data)), 150)) | set(range(first_data))
                       | set(rng.sample(range(len(data) - 2000, len(data)), 300)))
    caught = 0
    for position in positions:
        flipped = bytearray(data)
        flipped[position] ^= 1 << (position % 8)
        open(damaged, "wb").write(flipped)
        try:
            state = checkpoint.load(damaged)
        except checkpoint.CheckpointError:
            caught += 1
            continue
        assert not any(start <= position < start + size for start, size in records), position
        assert state.keys() == good.keys() and state["config"] == good["config"], position
        assert_identical(good, state)
    assert caught > len(positions) // 2
    for length in (0, 50, len(data) // 2, len(data) - 22, len(data) - 1):
        open(damaged, "wb").write(data[:length])
        assert checkpoint.verify(damaged) is not None, length


def test_checkpoints_are_valid_zip_files(tmp_path, dataset):
    import zipfile
    run(tmp_path, dataset, "--max_iters=2")
    path = checkpoint.path_for(str(tmp_path), 2)
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None
    if shutil.which("unzip"):
        assert subprocess.run(["unzip", "-tq", path], capture_output=True).returncode == 0
    assert checkpoint.verify(path) is None


# --- damage, and what is not damage --------------------------------------------------------------------------------

def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning(tmp_path, dataset, reference, capsys):
    run(tmp_path, dataset, "--max_iters=30", "--checkpoint_interval=10")
    path = checkpoint.path_for(str(tmp_path), 30)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 3] ^= 0x01
    open(path, "wb").write(data)
    capsys.readouterr()
    run(tmp_path, dataset, "--max_iters=40", "--checkpoint_interval=10")
    printed = capsys.readouterr().out
    assert f"warning: checkpoint {path} is unusable: checksum mismatch" in printed
    assert "resuming from step 20" in printed
    assert_identical(state_at(reference, 40), state_at(tmp_path, 40))
    (aside,) = glob.glob(str(tmp_path / "abandoned-*"))  # the damaged file is kept, out of the way
    assert sorted(os.listdir(aside)) == ["ckpt_0000030.pt", "metrics.jsonl"]


def test_unusable_checkpoints_and_finished_runs_are_said_plainly(tmp_path, dataset, capsys):
    run(tmp_path, dataset, "--max_iters=10", "--checkpoint_interval=5")
    run(tmp_path, dataset, "--max_iters=10")
    assert "nothing to train: step 10 has reached max_iters=10" in capsys.readouterr().out
    os.replace(checkpoint.path_for(str(tmp_path), 5), tmp_path / "five")
    shutil.copy(checkpoint.path_for(str(tmp_path), 10), checkpoint.path_for(str(tmp_path), 5))  # step 10 named 5
    open(checkpoint.path_for(str(tmp_path), 10), "r+b").truncate(1000)
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(
            f"no usable checkpoint in {tmp_path} (step 10: not a whole zip file (File is not a zip file): truncated, "
            f"or not a checkpoint; step 5: it holds step 10, not the step in its name); --from_checkpoint_step=0")):
        run(tmp_path, dataset, "--max_iters=20")
    assert checkpoint.list_steps(str(tmp_path)) == [5, 10]  # nothing was moved or trained


def test_a_read_error_is_not_damage(tmp_path, dataset, monkeypatch):
    """EIO (or EMFILE, ENOMEM) while reading a good newest checkpoint stops a resume with one line and moves
    nothing: only a failed check of the file's own bytes is damage."""
    run(tmp_path, dataset, "--max_iters=20", "--checkpoint_interval=10")
    before = files_and_mtimes(tmp_path)

    def verify(path):
        raise OSError(errno.EIO, "Input/output error", path)

    monkeypatch.setattr(checkpoint, "verify", verify)
    with pytest.raises(checkpoint.CheckpointError, match=r"cannot read checkpoint .*20.pt: Input/output error"):
        run(tmp_path, dataset, "--max_iters=30", "--checkpoint_interval=10")
    assert files_and_mtimes(tmp_path) == before


def test_a_checkpoint_pruned_while_it_is_read_is_not_damage(tmp_path, dataset, monkeypatch, capsys):
    """A reader of a live run that prunes (sample.py, export.py, eval_only, init_from, checkpoint.py) may find a
    listed file gone by the time it opens it: it takes the newest file there is now and warns of no damage; the
    listing leaves a vanished file out."""
    run(tmp_path, dataset, "--max_iters=30", "--checkpoint_interval=10")
    newest = checkpoint.path_for(str(tmp_path), 30)
    os.replace(newest, tmp_path / "later")  # the folder holds 10 and 20; 30 is yet to come
    real_verify = checkpoint.verify

    def verify_while_the_run_goes_on(path):  # the live run publishes 30 and prunes 20 as the reader opens 20
        if os.path.exists(tmp_path / "later"):
            os.replace(tmp_path / "later", newest)
            os.remove(path)
        return real_verify(path)

    monkeypatch.setattr(checkpoint, "verify", verify_while_the_run_goes_on)
    step, state = checkpoint.find_to_read(str(tmp_path), -1, "sample from")
    assert step == 30 and state["step"] == 30
    assert "warning" not in capsys.readouterr().err
    monkeypatch.setattr(checkpoint, "verify", lambda path: (os.remove(path), real_verify(path))[1])
    text, all_ok = checkpoint.describe(str(tmp_path))
    assert all_ok and text.count("\n") == 0  # each file vanished as it was read: none listed, none refused


def test_a_stray_file_named_like_a_checkpoint_is_no_checkpoint(tmp_path, dataset, reference):
    """ckpt_00000030.pt (8 digits) is no step's file: a start ignores it, moves nothing, sets nothing aside."""
    run(tmp_path, dataset, "--max_iters=20", "--checkpoint_interval=10")
    shutil.copy(checkpoint.path_for(str(tmp_path), 20), tmp_path / "ckpt_00000030.pt")
    assert checkpoint.list_steps(str(tmp_path)) == [10, 20]
    run(tmp_path, dataset, "--max_iters=40", "--checkpoint_interval=10")
    assert_identical(state_at(reference, 40), state_at(tmp_path, 40))
    assert not glob.glob(str(tmp_path / "abandoned-*")) and (tmp_path / "ckpt_00000030.pt").exists()


def test_pickled_code_in_a_checkpoint_is_never_run(tmp_path, dataset):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    out = tmp_path / "out"
    out.mkdir()
    checkpoint.save(str(out), 5, {"model": Payload(), "step": 5})  # a valid checksum: only the pickle is bad
    for main, args in ((train.main, [*TINY, f"--dataset={dataset}", f"--out_dir={out}", "--from_checkpoint_step=5"]),
                       (sample.main, [f"--out_dir={out}", "--from_checkpoint_step=5", "--device=cpu"])):
        with pytest.raises(checkpoint.CheckpointError, match=re.escape("refused by torch.load(weights_only=True)")):
            main(args)
    assert "refused by torch.load(weights_only=True)" in checkpoint.describe(str(out))[0]
    assert not marker.exists()


# --- retention, and the listing ------------------------------------------------------------------------------------

def test_retention_keeps_the_newest_milestones_and_the_resumed_step(tmp_path, dataset):
    keep = ["--checkpoint_interval=2", "--keep_last_checkpoints=2", "--keep_every=10"]
    run(tmp_path, dataset, "--max_iters=14", *keep)
    assert checkpoint.list_steps(str(tmp_path)) == [10, 12, 14]
    run(tmp_path, dataset, "--max_iters=6", "--checkpoint_interval=2", "--from_checkpoint_step=0")
    run(tmp_path, dataset, "--max_iters=20", *keep, "--from_checkpoint_step=4", "--keep_every=0")
    assert checkpoint.list_steps(str(tmp_path)) == [4, 18, 20]  # 4: the step this run resumed from
    assert len(glob.glob(str(tmp_path / "abandoned-*" / "*.pt"))) == 3 + 1  # two rewinds set aside 10-14 and 6


def test_keep_best_keeps_the_checkpoint_with_the_best_val_loss(tmp_path, dataset):
    # min_lr far above learning_rate: the rate climbs as it "decays", and the run diverges after its best point
    diverging = ["--max_iters=30", "--checkpoint_interval=5", "--eval_interval=5", "--keep_last_checkpoints=1",
                 "--min_lr=20.0", "--lr_decay_iters=30", "--warmup_iters=2"]
    run(tmp_path / "a", dataset, *diverging)
    evals = {m["step"]: m["val_loss"] for m in read_metrics(tmp_path / "a") if "val_loss" in m}
    best = min(evals, key=evals.get)
    assert best < 30 and checkpoint.list_steps(str(tmp_path / "a")) == [best, 30]
    assert state_at(tmp_path / "a", 30)["best_checkpoint"] == [evals[best], best]
    run(tmp_path / "b", dataset, *diverging, "--keep_best=False")
    assert checkpoint.list_steps(str(tmp_path / "b")) == [30]


def test_checkpoint_py_lists_and_verifies(tmp_path, dataset):
    run(tmp_path, dataset, "--max_iters=20", "--checkpoint_interval=10", "--eval_interval=20")
    open(checkpoint.path_for(str(tmp_path), 10), "r+b").truncate(5000)
    done = run_process(["checkpoint.py", str(tmp_path)])
    assert done.returncode == 1, done.stderr  # a damaged file: scripts can use checkpoint.py as a check
    header, row10, row20 = done.stdout.splitlines()
    assert header.split() == ["step", "written", "train", "loss", "val", "loss", "size", "status"]
    assert row10.split()[0] == "10" and "not a whole zip file" in row10
    state = state_at(tmp_path, 20)
    assert row20.split()[0] == "20" and row20.endswith("ok") and f"{state['val_loss']:.4f}" in row20
