"""
One checkpoint file per step, <out_dir>/ckpt_<step>.pt: the state after that many optimizer steps.

A file is what torch.save writes, a zip file whose records each carry a CRC32, and it loads with
torch.load(path, weights_only=True). It is written under a temporary name, fsynced and renamed, so a file with
a final name is complete. load() checks every record against its CRC32 first, so a file damaged later (cut short
by a copy, a bit flipped on disk) is refused, never loaded.

In order below: writing (snapshot, save, publish), reading (verify, load, find), and the folder (set_aside_newer
for rewinds, prune, remove_temporaries, lock: one run per out_dir, describe: `python checkpoint.py out_dir`).
"""
import fcntl
import mmap
import os
import re
import socket
import sys
import time
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.utils.serialization import config as torch_save_config

CKPT_NAME = re.compile(r"ckpt_(\d{7,})\.pt")
TMP_SUFFIX = ".tmp"
LOCK_NAME = "train.lock"
_checkers = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))  # zlib.crc32 releases the GIL


class CheckpointError(Exception):
    """A checkpoint that is absent, damaged or unusable: the scripts print it as one line and exit 2."""


class Abandoned(Exception):
    """A save given up on request (a second Ctrl-C): its temporary file is gone, nothing else changed."""


def path_for(out_dir, step):
    return os.path.join(out_dir, f"ckpt_{step:07d}.pt")


def list_steps(out_dir):
    """Steps with a published checkpoint in out_dir, oldest first; temporary files never count."""
    if not os.path.isdir(out_dir):
        return []
    return sorted(int(m.group(1)) for m in map(CKPT_NAME.fullmatch, os.listdir(out_dir)) if m)


def snapshot(state, buffers=None):
    """A host copy of state's tensors (in nested dicts and lists), for a save to write while training goes on
    changing its own. With a dict of `buffers`, the copies land in the buffers of the last call (pinned when the
    source is on a GPU, so they copy at full speed); None makes new, unpinned ones. Tied weights stay tied."""
    pin, buffers, copies, devices = buffers is not None, {} if buffers is None else buffers, {}, set()

    def copy(obj, key):
        if isinstance(obj, torch.Tensor):
            source = (obj.untyped_storage().data_ptr(), obj.storage_offset(), obj.shape, obj.stride(), obj.dtype)
            if source not in copies:
                buf = buffers.get(key)
                if buf is None or buf.shape != obj.shape or buf.dtype != obj.dtype:
                    buf = buffers[key] = torch.empty(obj.shape, dtype=obj.dtype, pin_memory=pin and obj.is_cuda)
                copies[source] = buf.copy_(obj, non_blocking=True)
                devices.add(obj.device.type)
            return copies[source]
        if isinstance(obj, dict):
            return {k: copy(v, key + (k,)) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(copy(v, key + (i,)) for i, v in enumerate(obj))
        return obj

    host = copy(state, ())
    if "cuda" in devices:  # the non_blocking copies must land before the writer thread reads them
        torch.cuda.synchronize()
    if "mps" in devices:
        torch.mps.synchronize()
    return host


class _Output:
    """The temporary file, as torch.save writes into it: it stops when `abandon` is set, and has the kernel start
    writing each large piece to disk at once, so the final fsync waits for little."""

    def __init__(self, f, abandon):
        self.f, self.abandon, self.written, self.error = f, abandon, 0, None

    def write(self, data):
        try:
            if self.abandon is not None and self.abandon.is_set():
                raise Abandoned()
            n = self.f.write(data)
            self.written += n
            if n >= 1 << 20 and hasattr(os, "posix_fadvise"):
                self.f.flush()
                os.posix_fadvise(self.f.fileno(), self.written - n, n, os.POSIX_FADV_DONTNEED)
            return n
        except BaseException as e:  # for save(): torch's zip writer may turn it into a RuntimeError
            self.error = e
            raise

    def flush(self):
        self.f.flush()


def save(out_dir, step, state, abandon=None):
    """Publish ckpt_<step>.pt atomically: temporary name, fsync, rename, fsync of the folder. Setting the
    threading.Event `abandon` stops a save in progress (Abandoned); whatever fails, no temporary file stays."""
    if not torch_save_config.save.compute_crc32:  # on by default; off, every record would fail its check
        raise CheckpointError("torch.utils.serialization.config.save.compute_crc32 is off: checkpoints need it")
    path = path_for(out_dir, step)
    tmp = path + TMP_SUFFIX
    out = None
    try:
        with open(tmp, "wb") as f:
            out = _Output(f, abandon)
            torch.save(state, out)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(out_dir)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        # torch's zip writer may report what failed in write() (a disk error, Ctrl-C, Abandoned) as a RuntimeError
        cause = out.error if out and out.error else e
        if isinstance(cause, OSError):
            raise CheckpointError(f"cannot write checkpoint {cause.filename or tmp}: {cause.strerror}") from None
        raise cause
    return path


def publish(out_dir, step, state, keep_last, keep_every, protect, abandon=None):
    """save, then prune: all that a checkpoint costs, whether it runs in the foreground or the background."""
    return save(out_dir, step, state, abandon), prune(out_dir, keep_last, keep_every, protect)


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify(path):
    """What is wrong with the checkpoint file at path, or None when each record's data matches its CRC32."""
    try:
        with zipfile.ZipFile(path) as z:
            records = z.infolist()
    except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError) as e:
        return f"not a whole zip file ({e}): truncated, or not a checkpoint"
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        def damaged(r):  # a record's data follows its local header, whose last fields say how long the header is
            header = m[r.header_offset:r.header_offset + 30]
            start = r.header_offset + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")
            with memoryview(m) as view, view[start:start + r.file_size] as data:
                return header[:4] != b"PK\x03\x04" or len(data) != r.file_size or zlib.crc32(data) != r.CRC
        bad = [r.filename for r, d in zip(records, _checkers.map(damaged, records)) if d]
    return f"checksum mismatch in {bad[0]}: the file is damaged" if bad else None


def load(path):
    """Verify and load a checkpoint (tensors and plain data only); CheckpointError when it is unusable,
    including when it holds another step than its name says."""
    try:
        problem = verify(path)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror}") from None
    if problem is None:
        try:
            # mmap: tensors come straight from the page cache the check just filled, copy-on-write
            state = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
        except Exception as e:  # weights_only refuses anything but tensors and plain data
            problem = f"refused by torch.load(weights_only=True): {str(e).splitlines()[0]}"
        else:
            named = CKPT_NAME.fullmatch(os.path.basename(path))
            if not named or (isinstance(state, dict) and state.get("step") == int(named.group(1))):
                return state
            problem = f"it holds step {state.get('step') if isinstance(state, dict) else None!r}, not the step in its name"
    raise CheckpointError(f"checkpoint {path} is unusable: {problem}")


def find(out_dir, requested, warn=print):
    """The (step, state) to resume: requested=-1 is the newest good checkpoint, skipping damaged ones with a
    warning, or (0, None) when there is none (when there are only damaged ones, an error lists them);
    N > 0 is exactly step N; 0 is a fresh start."""
    if requested == 0:
        return 0, None
    steps = list_steps(out_dir)
    if requested > 0 and requested not in steps:
        raise CheckpointError(f"no checkpoint for step {requested} in {out_dir} "
                              f"(steps available: {', '.join(map(str, steps)) or 'none'})")
    if requested > 0:
        return requested, load(path_for(out_dir, requested))
    problems = []
    for step in reversed(steps):
        try:
            return step, load(path_for(out_dir, step))
        except CheckpointError as e:
            warn(f"warning: {e}; trying an older one")
            problems.append(f"step {step}: {str(e).split(': ', 1)[-1]}")
    if problems:
        raise CheckpointError(f"no usable checkpoint in {out_dir} ({'; '.join(problems)}); "
                              f"--from_checkpoint_step=0 starts over and sets them aside")
    return 0, None


def find_to_read(out_dir, requested, reader):
    """find for a script that only reads a run (sample.py, export.py): -1 is the newest good checkpoint, N exactly
    step N; `reader` says what the script does with it ("sample from"), for the error when there is none."""
    if requested < -1 or requested == 0:
        raise CheckpointError(f"from_checkpoint_step must be -1 (newest) or a step, got {requested}")
    step, state = find(out_dir, requested, warn=lambda message: print(message, file=sys.stderr))
    if state is None:
        raise CheckpointError(f"no checkpoint to {reader} in {out_dir}")
    return step, state


def set_aside_newer(out_dir, step):
    """Rewinding: move checkpoints newer than step into abandoned-<time>/ so 'latest' never mixes two timelines."""
    newer = [s for s in list_steps(out_dir) if s > step]
    if not newer:
        return None
    stamp = time.strftime("abandoned-%Y%m%d-%H%M%S")
    folder, n = os.path.join(out_dir, stamp), 1
    while os.path.exists(folder):  # two rewinds within one second
        n += 1
        folder = os.path.join(out_dir, f"{stamp}-{n}")
    os.makedirs(folder)
    for s in newer:
        os.replace(path_for(out_dir, s), os.path.join(folder, os.path.basename(path_for(out_dir, s))))
    fsync_dir(out_dir)
    return folder


def prune(out_dir, keep_last, keep_every, protect=()):
    """After a publish: keep the newest keep_last checkpoints (0 keeps all), every step divisible by keep_every
    (milestones, kept for good), and the steps in protect; delete the rest. abandoned-* folders are not touched."""
    steps = list_steps(out_dir)
    if keep_last == 0 or not steps:
        return []
    keep = set(steps[-keep_last:]) | set(protect) | {steps[-1]}
    doomed = [s for s in steps if s not in keep and not (keep_every and s % keep_every == 0)]
    for s in doomed:
        try:
            os.remove(path_for(out_dir, s))
        except OSError as e:  # a checkpoint we failed to delete costs disk space, not correctness
            print(f"warning: cannot delete {e.filename}: {e.strerror}")
    return doomed


def remove_temporaries(out_dir):
    """Delete what a crash mid-save left behind; no reader ever looks at these files."""
    for name in os.listdir(out_dir):
        if name.endswith(TMP_SUFFIX) and CKPT_NAME.fullmatch(name[:-len(TMP_SUFFIX)]):
            os.remove(os.path.join(out_dir, name))


def lock(out_dir):
    """Hold out_dir for this run: an exclusive flock on out_dir/train.lock, which the kernel releases when the
    process ends, kill -9 included. Returns the open file (close it to release); CheckpointError names the
    holder when another process has it. A filesystem without locks gets a warning, not a refusal."""
    try:
        f = open(os.path.join(out_dir, LOCK_NAME), "a+")
    except OSError as e:
        raise CheckpointError(f"cannot open {e.filename}: {e.strerror}") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "a process that is starting"
        f.close()
        raise CheckpointError(f"out_dir {out_dir} is in use by another run ({holder}); "
                              f"wait for it to end, or pass another out_dir") from None
    except OSError as e:
        print(f"warning: cannot lock {f.name} ({e.strerror}): make sure no other run uses {out_dir}")
        return f
    f.truncate(0)
    f.write(f"host {socket.gethostname()}, pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    return f


def describe(out_dir):
    """One line per checkpoint: step, when written, train/val loss at that step, size, and whether it verifies."""
    lines = [f"{'step':>7}  {'written':19}  {'train loss':>10}  {'val loss':>8}  {'size':>10}  status"]
    origin, names = "scratch", sorted(os.listdir(out_dir))
    for step in list_steps(out_dir):
        path = path_for(out_dir, step)
        try:  # a live run may prune this file while we look
            written, size = os.path.getmtime(path), os.path.getsize(path)
            state = load(path)
            written, losses, status = state["written_at"], (state["train_loss"], state["val_loss"]), "ok"
            origin = state.get("origin", origin)
        except FileNotFoundError:
            continue
        except CheckpointError as e:
            losses, status = (None, None), str(e).split(": ", 1)[-1]
        train, val = ("-" if loss is None else f"{loss:.4f}" for loss in losses)
        lines.append(f"{step:>7}  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(written))}  {train:>10}  {val:>8}  "
                     f"{size / 1e6:>7.1f} MB  {status}")
    for note, found in (("started from", [] if origin == "scratch" else [origin]),
                        ("incomplete writes (ignored, removed at the next start)", [n for n in names if n.endswith(TMP_SUFFIX)]),
                        ("set aside by rewinds", [n for n in names if n.startswith("abandoned-")])):
        if found:
            lines.append(f"{note}: {', '.join(found)}")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2 or not os.path.isdir(sys.argv[1]):
        print("usage: python checkpoint.py <out_dir>   (lists the checkpoints in out_dir and verifies each)", file=sys.stderr)
        sys.exit(2)
    print(describe(sys.argv[1]))
