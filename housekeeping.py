"""
The bookkeeping of a run's out_dir, apart from the checkpoint files (checkpoint.py) and the metrics (logs.py):

- one run per folder: an flock on out_dir/train.lock (lock), and a check before every write that the folder is
  still the one locked (Guard);
- rewinds: newer checkpoints and their metrics set aside in abandoned-<time>/, in an order that a kill at any
  moment cannot make lose anything, and that a rerun completes (rewind);
- what a crash left behind, cleaned at the next start (clean_leftovers).

outdir.py calls these at the right moments; nothing here decides when.
"""
import fcntl
import os
import socket
import time

import checkpoint
from configurator import ConfigError
from logs import metrics_path, split_metrics, write_whole

LOCK_NAME = "train.lock"


def check_out_dir(cfg):
    """out_dir must be a folder this process can write in, or one it can create (nothing is created here)."""
    if not cfg["out_dir"]:
        raise ConfigError("out_dir must not be empty")
    path = os.path.abspath(cfg["out_dir"])
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise ConfigError(f"out_dir {cfg['out_dir']}: {path} is not a folder")
    if not cfg["eval_only"] and not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"out_dir {cfg['out_dir']}: {path} is not writable")


def lock(out_dir):
    """Hold out_dir for this run: an exclusive flock on out_dir/train.lock, which the kernel releases when the
    process ends, kill -9 included. Returns the open file (close it to release). CheckpointError names the holder
    when another process has it. A filesystem without locks gets a warning, not a refusal."""
    path = os.path.join(out_dir, LOCK_NAME)
    try:
        f = open(path, "a+")
    except OSError as e:
        raise checkpoint.CheckpointError(f"cannot open {path}: {e.strerror}") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "a process that is starting"
        f.close()
        raise checkpoint.CheckpointError(f"out_dir {out_dir} is in use by another run ({holder}); "
                                         f"wait for it to end, or pass another out_dir") from None
    except OSError as e:
        print(f"warning: cannot lock {path} ({e.strerror}): make sure no other run uses {out_dir}")
        return f
    holder = f"host {socket.gethostname()}, pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
    try:
        f.truncate(0)
        f.write(holder + "\n")
        f.flush()
    except OSError as e:
        f.close()
        raise checkpoint.CheckpointError(f"cannot write {path}: {e.strerror}") from None
    return f


class Guard:
    """Called before each write into out_dir: CheckpointError unless out_dir/train.lock is still the file this run
    locked. A folder deleted and made anew, or a train.lock deleted or replaced, holds another run's files now (or
    soon): writing or pruning there would mix two runs in one folder."""

    def __init__(self, out_dir, lock_file):
        self.out_dir = out_dir
        self.held = os.fstat(lock_file.fileno())
        self.folder = os.stat(out_dir)

    def foreign(self):
        """Whether the folder at out_dir's path is another than the one locked: a file written there by path
        since then landed in another run's folder."""
        return not checkpoint.same_file(self.out_dir, self.folder)

    def __call__(self):
        path = os.path.join(self.out_dir, LOCK_NAME)
        try:
            now = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            now = None
        except OSError as e:  # the disk failed, not the folder changed: say so
            raise checkpoint.CheckpointError(f"cannot check {path}: {e.strerror}") from None
        if now is None or (now.st_dev, now.st_ino) != (self.held.st_dev, self.held.st_ino):
            raise checkpoint.CheckpointError(f"out_dir {self.out_dir} is no longer the folder this run locked (it, "
                                             f"or its {LOCK_NAME}, was deleted or replaced): stopped without "
                                             f"writing there")


def rewind(out_dir, step):
    """Make out_dir hold the timeline up to `step` alone, in an order that a kill at any moment cannot make lose
    anything, and that a rerun completes:
      1. a new folder abandoned-<time>/ gets the metrics lines past `step`, written whole;
      2. the newer checkpoints move into it;
      3. metrics.jsonl keeps the lines up to `step`, written whole.
    With no newer checkpoint only step 3 runs: lines past `step` are then of steps a crash lost, which this run
    computes again. Returns the abandoned folder, or None."""
    newer = [s for s in checkpoint.list_steps(out_dir) if s > step]
    kept, past = split_metrics(out_dir, step)
    abandoned = None
    if newer:
        stamp = time.strftime("abandoned-%Y%m%d-%H%M%S")
        abandoned = os.path.join(out_dir, stamp)
        n = 1
        while os.path.exists(abandoned):  # two rewinds within one second
            n += 1
            abandoned = os.path.join(out_dir, f"{stamp}-{n}")
        os.makedirs(abandoned)
        write_whole(metrics_path(abandoned), past)
        for s in newer:
            name = os.path.basename(checkpoint.path_for(out_dir, s))
            os.replace(os.path.join(out_dir, name), os.path.join(abandoned, name))
        checkpoint.fsync_dir(out_dir)
    if past or os.path.exists(metrics_path(out_dir)):
        write_whole(metrics_path(out_dir), kept)
    return abandoned


def clean_leftovers(out_dir):
    """Delete what a crash left: half-written checkpoints and metrics files, a rewind's folder it never filled. A
    folder holding a complete metrics.jsonl stays, even one a rewind killed before its moves (its lines are then
    copies: losing nothing matters more)."""
    checkpoint.remove_temporaries(out_dir)
    folders = [out_dir]
    for name in os.listdir(out_dir):
        if name.startswith("abandoned-"):
            folders.append(os.path.join(out_dir, name))
    for folder in folders:
        if os.path.exists(metrics_path(folder) + ".tmp"):
            os.remove(metrics_path(folder) + ".tmp")
        if folder != out_dir and os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)
