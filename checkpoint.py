"""
One checkpoint file per step, <out_dir>/ckpt_<step>.pt, holding the state after that many optimizer steps.

A file is an ordinary torch.save zip that loads with torch.load(path, weights_only=True). Its zip comment
holds a sha256 tree digest of every byte before it (the sha256 of the sha256s of its 16 MiB chunks, which
threads compute in parallel), so a truncated or bit-flipped file is always caught on load.
Files are written under a temporary name, fsynced, and renamed: a file with a final name is complete.
"""
import fcntl
import hashlib
import os
import re
import socket
import struct
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

CKPT_NAME = re.compile(r"ckpt_(\d{7,})\.pt")
TMP_SUFFIX = ".tmp"
LOCK_NAME = "train.lock"
# the zip comment: "sha256tree:" and 64 hex digits; the two bytes before it are the zip's comment length
DIGEST_PREFIX = b"sha256tree:"
HASH_CHUNK = 16 << 20  # part of the format: files written with another chunk size do not verify
TRAILER_LEN = len(DIGEST_PREFIX) + 64
EOCD_SIGNATURE = b"PK\x05\x06"  # a zip's end-of-central-directory record, 22 bytes before its comment


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


def snapshot(state, buffers):
    """A host copy of state's tensors (in nested dicts and lists) for a save to write while training goes on
    changing its own. The copies land in `buffers`, reused from the last call (pinned when the source is on a
    GPU, so the copies run at full speed); tensors that share memory, as tied weights do, stay shared."""
    copies, devices = {}, set()

    def copy(obj, key):
        if isinstance(obj, torch.Tensor):
            source = (obj.untyped_storage().data_ptr(), obj.storage_offset(), obj.shape, obj.stride(), obj.dtype)
            if source not in copies:
                buf = buffers.get(key)
                if buf is None or buf.shape != obj.shape or buf.dtype != obj.dtype:
                    buf = buffers[key] = torch.empty(obj.shape, dtype=obj.dtype, pin_memory=obj.is_cuda)
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


# sha256 runs on these threads while the disk reads or writes (hashlib releases the GIL), one chunk a thread
HASH_THREADS = min(8, os.cpu_count() or 1)
_hashers = ThreadPoolExecutor(max_workers=HASH_THREADS)


def tree_digest(chunk_digests):
    return hashlib.sha256(b"".join(chunk_digests)).hexdigest().encode()


class ChecksummedFile:
    """What torch.save writes into: bytes go to the file while other threads hash them, each piece into the
    sha256 of its 16 MiB chunk. The last 22 bytes, the zip's end record, are held back, so that finish() can
    set its comment length before they are hashed."""

    def __init__(self, f, abandon):
        self.f, self.abandon, self.held, self.chunks, self.offset, self.error = f, abandon, b"", [], 0, None

    def write(self, data):
        try:
            if self.abandon is not None and self.abandon.is_set():
                raise Abandoned()
            data = memoryview(data).cast("B")
            if len(data) >= 22:
                self._emit(self.held)
                self._emit(data[:-22])
                self.held = bytes(data[-22:])
            else:
                joined = self.held + bytes(data)
                self._emit(joined[:-22])
                self.held = joined[-22:]
            return len(data)
        except BaseException as e:  # torch's zip writer turns it into a RuntimeError: keep the cause for save()
            self.error = e
            raise

    def _emit(self, data):
        hashing, pos = [], 0
        while pos < len(data):  # a call gives each chunk at most one piece, so a chunk's pieces arrive in order
            k = self.offset // HASH_CHUNK
            if k == len(self.chunks):
                self.chunks.append(hashlib.sha256())
            piece = data[pos:pos + min(len(data) - pos, (k + 1) * HASH_CHUNK - self.offset)]
            if len(piece) < (1 << 20):  # handing small pieces to a thread would cost more than hashing them
                self.chunks[k].update(piece)
            else:
                hashing.append(_hashers.submit(self.chunks[k].update, piece))
            pos += len(piece)
            self.offset += len(piece)
        try:
            self.f.write(data)
        finally:  # data may be freed once write returns: its hashing must be done by then
            for h in hashing:
                h.result()
        if hashing and hasattr(os, "posix_fadvise"):
            # start writing these pages to disk now, not all at the final fsync: the disk works while we hash
            os.posix_fadvise(self.f.fileno(), self.offset - len(data), len(data), os.POSIX_FADV_DONTNEED)

    def flush(self):
        pass

    def finish(self):
        end = bytearray(self.held)
        assert end[:4] == EOCD_SIGNATURE and end[-2:] == b"\0\0", "torch.save wrote an unexpected zip ending"
        end[-2:] = struct.pack("<H", TRAILER_LEN)
        self._emit(bytes(end))
        self.f.write(DIGEST_PREFIX + tree_digest(h.digest() for h in self.chunks))


def save(out_dir, step, state, abandon=None):
    """Publish ckpt_<step>.pt atomically: temporary name, fsync, rename, fsync of the folder. Setting the
    threading.Event `abandon` stops a save in progress (Abandoned); whatever fails, no temporary file stays."""
    path = path_for(out_dir, step)
    tmp = path + TMP_SUFFIX
    out = None
    try:
        with open(tmp, "wb") as f:
            out = ChecksummedFile(f, abandon)
            torch.save(state, out)
            out.finish()
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(out_dir)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        # torch's zip writer reports whatever failed inside it (a disk error, Ctrl-C, Abandoned) as a RuntimeError
        cause = out.error if out is not None and out.error is not None else e
        while isinstance(cause, RuntimeError) and cause.__context__ is not None:
            cause = cause.__context__
        if isinstance(cause, OSError):
            raise CheckpointError(f"cannot write checkpoint {cause.filename or tmp}: {cause.strerror}") from None
        raise cause
    return path


def publish(out_dir, step, state, keep_last, keep_every, protect, abandon=None):
    """save, then prune: all that a checkpoint costs, whether it runs in the foreground or the background."""
    return save(out_dir, step, state, abandon), prune(out_dir, keep_last, keep_every, protect)


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


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify(path):
    """What is wrong with the checkpoint file at path, or None when its digest proves it intact."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if size < 22 + TRAILER_LEN:
            return f"truncated ({size} bytes)"
        tail = os.pread(f.fileno(), 22 + TRAILER_LEN, size - 22 - TRAILER_LEN)
        if tail[:4] != EOCD_SIGNATURE or tail[20:22] != struct.pack("<H", TRAILER_LEN) \
                or not tail[22:].startswith(DIGEST_PREFIX):
            return "no checksum trailer: truncated, or not a checkpoint of this trainer"
        # read chunk after chunk while earlier ones are hashed; a buffer is reused once its chunk's hash is done
        body = size - TRAILER_LEN
        buffers = [bytearray(min(HASH_CHUNK, body)) for _ in range(HASH_THREADS + 1)]
        hashing = []
        for i, offset in enumerate(range(0, body, HASH_CHUNK)):
            if i >= len(buffers):
                hashing[i - len(buffers)].result()
            view = memoryview(buffers[i % len(buffers)])[:min(HASH_CHUNK, body - offset)]
            got = 0
            while got < len(view):
                n = f.readinto(view[got:])
                if not n:
                    return f"truncated while being read ({offset + got} bytes)"
                got += n
            hashing.append(_hashers.submit(lambda v: hashlib.sha256(v).digest(), view))
        digest = tree_digest([h.result() for h in hashing])
    if digest != tail[22 + len(DIGEST_PREFIX):]:
        return "checksum mismatch: the file is damaged"
    return None


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
    if requested > 0:
        require_step(out_dir, requested)
        return requested, load(path_for(out_dir, requested))
    problems = []
    for step in reversed(list_steps(out_dir)):
        try:
            return step, load(path_for(out_dir, step))
        except CheckpointError as e:
            warn(f"warning: {e}; trying an older one")
            problems.append(f"step {step}: {str(e).split(': ', 1)[-1]}")
    if problems:
        raise CheckpointError(f"no usable checkpoint in {out_dir} ({'; '.join(problems)}); "
                              f"--from_checkpoint_step=0 starts over and sets them aside")
    return 0, None


def require_step(out_dir, step):
    """A CheckpointError that lists the steps there are, unless out_dir holds a checkpoint of `step`."""
    steps = list_steps(out_dir)
    if step not in steps:
        have = ", ".join(map(str, steps)) or "none"
        raise CheckpointError(f"no checkpoint for step {step} in {out_dir} (steps available: {have})")


def find_to_read(out_dir, requested, reader):
    """(step, state) for a script that only reads a run (sample.py, export.py): requested=-1 is the newest good
    checkpoint, N exactly step N. `reader` says what the script does with it ("sample from"), for the error."""
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


def describe(out_dir):
    """One row per checkpoint: step, when written, train/val loss at that step, size, and whether it verifies."""
    rows, origin = [("step", "written", "train loss", "val loss", "size", "status")], None
    for step in list_steps(out_dir):
        path = path_for(out_dir, step)
        try:  # a live run may prune this file while we look
            written, size = time.localtime(os.path.getmtime(path)), os.path.getsize(path)
        except FileNotFoundError:
            continue
        train_loss, val_loss, status = None, None, "ok"
        try:
            state = load(path)
            written = time.localtime(state["written_at"])
            train_loss, val_loss, origin = state.get("train_loss"), state.get("val_loss"), state.get("origin", origin)
        except CheckpointError as e:
            status = str(e).split(": ", 1)[-1]
        rows.append((str(step), time.strftime("%Y-%m-%d %H:%M:%S", written),
                     "-" if train_loss is None else f"{train_loss:.4f}", "-" if val_loss is None else f"{val_loss:.4f}",
                     f"{size / 1e6:.1f} MB", status))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows]
    leftovers = sorted(n for n in os.listdir(out_dir) if n.endswith(TMP_SUFFIX))
    aside = sorted(n for n in os.listdir(out_dir) if n.startswith("abandoned-"))
    if origin not in (None, "scratch"):
        lines.append(f"started from: {origin}")
    if leftovers:
        lines.append(f"incomplete writes (ignored, removed at the next start): {', '.join(leftovers)}")
    if aside:
        lines.append(f"set aside by rewinds: {', '.join(aside)}")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2 or not os.path.isdir(sys.argv[1]):
        print("usage: python checkpoint.py <out_dir>   (lists the checkpoints in out_dir and verifies each)", file=sys.stderr)
        sys.exit(2)
    print(describe(sys.argv[1]))
