"""
One checkpoint per step, the state after that many optimizer steps: a file <out_dir>/ckpt_<step>.pt, or a sharded
run's folder <out_dir>/ckpt_<step>/ (its format: sharded.py). Each is written under a temporary name, fsynced and
renamed: one with a final name is complete. A file is what torch.save writes, a zip file whose records each carry
a CRC32, and it loads with torch.load(path, weights_only=True); a folder's run.pt is such a file and records the
CRC32 of the folder's other files. load() checks every record and file first, so a checkpoint damaged later (cut
short by a copy, a bit flipped on disk) is refused, never loaded; it gives the same dict from a file or a folder.

In order below: writing (save), reading (verify, load, find), the out_dir (prune, remove_temporaries, describe:
`python checkpoint.py out_dir`), to_file. saver.py writes them in the background (a folder: saver.publish_folder);
what else a run keeps in out_dir (its lock, rewinds, metrics) is housekeeping.py's and logs.py's.
"""
import difflib
import mmap
import os
import re
import shutil
import sys
import time
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.utils.serialization import config as torch_save_config

from hf_gpt2 import from_nanogpt
from model import GPT, SHAPE_KEYS, GPTConfig

CKPT_NAME = re.compile(r"ckpt_(\d{7,})(\.pt)?")  # a file, or a sharded run's folder
TMP_SUFFIX = ".tmp"
RUN_NAME = "run.pt"  # in a sharded run's folder: all but the tensors, and the CRC32 of every other file
NANOGPT_NAME = "ckpt.pt"  # nanoGPT's one checkpoint file in its out_dir: init_from reads it, nothing resumes it
_checkers = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))  # zlib.crc32 releases the GIL


class CheckpointError(Exception):
    """A checkpoint that is absent, damaged or unusable: the scripts print it as one line and exit 2."""


class ReadError(CheckpointError):
    """The system could not read a checkpoint (EIO, EMFILE, ENOMEM): not damage, so nothing is set aside for it."""


class Vanished(CheckpointError):
    """A checkpoint deleted while it was read, as a live run's retention does: not damage either."""


class SaveCancelled(Exception):
    """A save given up on request (a second Ctrl-C): its temporary file is gone, nothing else changed."""


def path_for(out_dir, step, folder=None):
    """Step's checkpoint: the file ckpt_<step>.pt or the folder ckpt_<step>; folder=None: the one out_dir holds."""
    base = os.path.join(out_dir, f"ckpt_{step:07d}")
    return base if (os.path.isdir(base) if folder is None else folder) else base + ".pt"


def is_url(out_dir):
    """Whether out_dir is an object store's URL (s3://bucket/prefix, objstore.py's), not a folder."""
    return re.match(r"[a-z][a-z0-9+.-]*://", out_dir) is not None


def list_steps(out_dir):
    """Steps with a published checkpoint in out_dir, oldest first; temporary files never count. A folder that
    cannot be read is a CheckpointError, never "no checkpoints", from which a resume would start over."""
    folders = entries(out_dir)
    # canonical names only: ckpt_00000010.pt is no step's file, and a file this trainer never reads
    return sorted({int(m.group(1)) for m in map(CKPT_NAME.fullmatch, folders)
                   if m and m.group(0) == os.path.basename(path_for(out_dir, int(m.group(1)), not m.group(2)))
                   and folders[m.group(0)] == (not m.group(2))})


def entries(out_dir):
    """{name: whether it is a folder} of what out_dir holds; {} when there is no out_dir."""
    try:
        with os.scandir(out_dir) as found:
            return {entry.name: entry.is_dir() for entry in found}
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except OSError as e:
        raise CheckpointError(f"cannot list {out_dir}: {e.strerror}") from None


class _Output:
    """The temporary file, as torch.save writes into it: it stops when `cancel` is set, and has the kernel start
    writing each large piece to disk at once, so the final fsync waits for little."""

    def __init__(self, f, cancel):
        self.f = f
        self.cancel = cancel  # a threading.Event: set, the next write raises SaveCancelled
        self.written = 0  # bytes so far
        self.error = None  # what a write raised, which torch's zip writer may report as another error

    def write(self, data):
        try:
            if self.cancel is not None and self.cancel.is_set():
                raise SaveCancelled()
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


def save(out_dir, step, state, cancel=None, written=None, path=None):
    """Publish ckpt_<step>.pt (or `path`) atomically: temporary name, fsync, rename, fsync of the folder. Setting
    the threading.Event `cancel` stops a save in progress (SaveCancelled); whatever fails, no temporary file of ours
    stays. `written`, a list, gets the file's identity (see same_file)."""
    if not torch_save_config.save.compute_crc32:  # on by default; off, every record would fail its check
        raise CheckpointError("torch.utils.serialization.config.save.compute_crc32 is off: checkpoints need it")
    path = path or path_for(out_dir, step, folder=False)
    tmp = path + TMP_SUFFIX
    out = None
    ours = None  # the temporary file's identity, once it is open
    try:
        with open(tmp, "wb") as f:
            ours = os.fstat(f.fileno())
            out = _Output(f, cancel)
            torch.save(state, out)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(path) or ".")
    except BaseException as e:
        if ours is not None and same_file(tmp, ours):  # by path: never another run's, in a folder made anew
            try:
                os.remove(tmp)
            except OSError:  # the next start's remove_temporaries deletes it: the error to say is the first
                pass
        # torch's zip writer may report what failed in write() (a disk error, Ctrl-C, SaveCancelled) as a RuntimeError
        cause = out.error if out and out.error else e
        if isinstance(cause, OSError):
            raise CheckpointError(f"cannot write checkpoint {cause.filename or tmp}: {cause.strerror}") from None
        raise cause
    if written is not None:
        written.append(ours)
    return path


def same_file(path, stat):
    """Whether path names the file that os.stat or os.fstat described as `stat` (False when path is gone)."""
    try:
        now = os.stat(path)
    except OSError:
        return False
    return (now.st_dev, now.st_ino) == (stat.st_dev, stat.st_ino)


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
        if isinstance(e.__context__, OSError):  # zipfile calls a read that failed (EIO) no zip file: it is not damage
            raise e.__context__ from None
        return f"not a whole zip file ({e}): truncated, or not a checkpoint"
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        def damaged(r):  # a record's data follows its local header, whose last fields say how long the header is
            header = m[r.header_offset:r.header_offset + 30]
            extra = int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")
            start = r.header_offset + 30 + extra
            with memoryview(m) as view, view[start:start + r.file_size] as data:
                return header[:4] != b"PK\x03\x04" or len(data) != r.file_size or zlib.crc32(data) != r.CRC
        bad = [r.filename for r, d in zip(records, _checkers.map(damaged, records)) if d]
    return f"checksum mismatch in {bad[0]}: the file is damaged" if bad else None


def load(path, whole=True, checked=False):
    """Verify and load a checkpoint (tensors and plain data only). CheckpointError when it is damaged, not one of
    ours, or holds another step than its name says; ReadError when the system cannot read it (EIO, EMFILE: the
    file may be fine); Vanished when it is gone (a live run pruned it). whole=False leaves a folder's tensors on
    disk, for sharded.load_shards: its dict then has "shards", the folder, an empty model and no optimizer state;
    checked=True skips their CRC32s (rank 0 just checked them: the other ranks of a job would read it all again)."""
    try:
        folder = os.path.isdir(path)
        if folder:  # a sharded run's: DCP's modules take seconds to import, which a file never needs
            import sharded
            file = os.path.join(path, RUN_NAME)
        else:
            file = path
        problem = verify(file)
        if problem is None:
            # mmap: tensors come straight from the page cache the check just filled, copy-on-write
            state = torch.load(file, weights_only=True, map_location="cpu", mmap=True)
            if folder and isinstance(state, dict) and not checked:  # a non-dict: not_ours names what it holds
                problem = sharded.damaged(path, state)
        if folder and problem is None and isinstance(state, dict):
            state = sharded.read_whole(path, state) if whole else state | {"shards": path, "model": {}}
    except Exception as e:  # weights_only refuses anything but tensors and plain data; or the system failed
        failed = e if isinstance(e, OSError) else system_error(e)
        if isinstance(failed, FileNotFoundError):
            raise Vanished(f"checkpoint {path} is gone: deleted while being read") from None
        if failed is not None:
            raise ReadError(f"cannot read checkpoint {path}: {failed.strerror}; the file itself may be fine") from None
        problem = f"refused by torch.load(weights_only=True): {str(e).splitlines()[0]}"
    if problem is None and isinstance(state, dict) and "iter_num" in state and "step" not in state:
        try:
            state = from_nanogpt(state)
        except (KeyError, TypeError, AttributeError) as e:
            problem = f"a nanoGPT checkpoint without its {e}"
    if problem is None:
        problem = not_ours(state)
    if problem is None:
        named = CKPT_NAME.fullmatch(os.path.basename(path))
        if not named or state["step"] == int(named.group(1)):
            return state
        problem = f"it holds step {state['step']!r}, not the step in its name"
    raise CheckpointError(f"checkpoint {path} is unusable: {problem}")


def system_error(e):
    """The OSError behind an error of torch's C++ that says a system call failed, in strerror's words and number
    ("unable to mmap 359151 bytes from file <...>: Cannot allocate memory (12)"), or None."""
    said = re.search(r": ([^:]+) \((\d+)\)$", str(e).split("\n", 1)[0])
    if said and os.strerror(int(said.group(2))) == said.group(1):
        return OSError(int(said.group(2)), said.group(1))
    return None


def not_ours(state):
    """What a loaded file lacks of what every reader relies on (the weights, their shape, the step and the
    vocabulary), or None: a file of another trainer is refused in one line, not with a KeyError later."""
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a checkpoint's dict"
    kinds = {"model": dict, "model_args": dict, "step": int, "meta": dict}
    missing = [key for key, kind in kinds.items() if not isinstance(state.get(key), kind)]
    if not missing and not isinstance(state["meta"].get("vocab_size"), int):
        missing = ["meta's vocab_size"]
    if not missing and any(key not in state["model_args"] for key in SHAPE_KEYS):
        missing = [f"model_args' {', '.join(key for key in SHAPE_KEYS if key not in state['model_args'])}"]
    return f"not a checkpoint of this trainer: it has no {', no '.join(missing)}" if missing else None


def misfit(expected, saved):
    """What keeps `saved` ({name: tensor or shape}) from loading into a model whose state_dict is `expected`, in
    a few words (names missing, names unexpected, shapes that differ, the first few of each), or None."""
    saved_shapes = {}
    for name, value in saved.items():
        saved_shapes[name] = tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(value)
    missing = [name for name in expected if name not in saved_shapes]
    unexpected = [name for name in saved_shapes if name not in expected]
    reshaped = [name for name in expected if name in saved_shapes and saved_shapes[name] != tuple(expected[name].shape)]
    problems = []
    for what, names in (("missing", missing), ("unexpected", unexpected), ("other shapes", reshaped)):
        if names:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            problems.append(f"{what}: {', '.join(names[:3])}{more}")
    return "; ".join(problems) or None


def model_of(state, what):
    """The GPT that a checkpoint's (or init_from's) state describes, holding its weights, for a script that only
    reads it. A model.py changed since it was written (other fields, names or shapes) is one line: CheckpointError
    naming `what` and the difference."""
    try:
        model = GPT(GPTConfig(**state["model_args"]))
    except TypeError as e:  # a field the checkpoint has and this code's GPTConfig does not
        raise CheckpointError(f"{what}: its model_args do not fit this code's GPTConfig ({e})") from None
    problem = misfit(model.state_dict(), state["model"])
    if problem is not None:
        raise CheckpointError(f"{what}: its weights do not fit this code's model ({problem}); model.py has "
                              f"changed since it was written")
    model.load_state_dict(state["model"])
    return model


def groups_misfit(groups, saved_groups):
    """What keeps an optimizer's saved param_groups from loading into one with `groups` (their number, names or
    sizes differ), or None."""
    if len(groups) != len(saved_groups):
        return f"{len(saved_groups)} parameter groups in the checkpoint, {len(groups)} here"
    for group, saved in zip(groups, saved_groups):
        name = group.get("name", "?")
        if saved.get("name", name) != name:
            return f"a group named {saved['name']!r} in the checkpoint, {name!r} here"
        if len(saved["params"]) != len(group["params"]):
            return (f"group {name!r} holds {len(saved['params'])} parameters in the checkpoint, "
                    f"{len(group['params'])} here")
    return None


def find(out_dir, requested, warn=print, whole=True):
    """The (step, state) to resume: requested=-1 is the newest good checkpoint, skipping damaged ones with a
    warning, or (0, None) when there is none (when there are only damaged ones, an error lists them);
    N > 0 is exactly step N; 0 is a fresh start. A file that a live run deletes while it is read is not damage:
    the search starts again from what the folder holds now. A read error stops the search (ReadError)."""
    if requested == 0:
        return 0, None
    for _ in range(100):  # a live run prunes a file a step; a hundred in a row would be no run of ours
        steps = list_steps(out_dir)
        if requested > 0 and requested not in steps:
            raise CheckpointError(f"no checkpoint for step {requested} in {out_dir} "
                                  f"(steps available: {', '.join(map(str, steps)) or 'none'})")
        problems = []
        try:
            for step in [requested] if requested > 0 else reversed(steps):
                try:
                    return step, load(path_for(out_dir, step), whole)
                except (Vanished, ReadError):
                    raise
                except CheckpointError as e:
                    if requested > 0:
                        raise
                    warn(f"warning: {e}; trying an older one")
                    problems.append(f"step {step}: {str(e).split(': ', 1)[-1]}")
        except Vanished:
            continue
        if problems:
            raise CheckpointError(f"no usable checkpoint in {out_dir} ({'; '.join(problems)}); "
                                  f"--from_checkpoint_step=0 starts over and sets them aside")
        return 0, None
    raise CheckpointError(f"the checkpoints in {out_dir} vanish as fast as they are read")


def find_to_read(out_dir, requested, reader):
    """find for a script that only reads a run (sample.py, export.py): -1 is the newest good checkpoint, N exactly
    step N; `reader` says what the script does with it ("sample from"), for the error when there is none."""
    if requested < -1 or requested == 0:
        raise CheckpointError(f"from_checkpoint_step must be -1 (newest) or a step, got {requested}")
    if is_url(out_dir):  # a bucket's: downloaded into a read cache of its own, never a live run's folder
        import objstore
        return objstore.find_to_read(out_dir, requested, reader)
    step, state = find(out_dir, requested, lambda m: print(m, file=sys.stderr)) if list_steps(out_dir) else (0, None)
    if state is None:
        raise CheckpointError(f"no checkpoint to {reader} in {out_dir}{similar_run(out_dir)}")
    return step, state


def similar_run(out_dir):
    """' (did you mean --out_dir=X?)' for a folder X beside out_dir, with a similar name, that has checkpoints."""
    parent, name = os.path.split(os.path.normpath(out_dir))
    try:
        runs = [n for n in os.listdir(parent or ".") if n != name and list_steps(os.path.join(parent, n))]
    except (OSError, CheckpointError):  # a folder there that cannot be read: no suggestion, the error stands
        runs = []
    close = difflib.get_close_matches(name, runs, n=1)
    return f" (did you mean --out_dir={os.path.join(parent, close[0])}?)" if close else ""


def doomed(steps, keep_last, keep_every, protect):
    """The steps retention deletes among `steps` (oldest first), on disk (prune) as in a bucket (remote.py): all but
    the newest keep_last (0 keeps all), every step divisible by keep_every (milestones, kept for good), those in
    protect, and the newest."""
    if keep_last == 0 or not steps:
        return []
    keep = set(steps[-keep_last:]) | set(protect) | {steps[-1]}
    return [s for s in steps if s not in keep and not (keep_every and s % keep_every == 0)]


def prune(out_dir, keep_last, keep_every, protect=()):
    """After a publish: delete the checkpoints `doomed` chooses, and return their steps. abandoned-* folders are not
    touched."""
    if keep_last == 0:  # keeps every checkpoint: nothing to list
        return []
    try:
        steps = list_steps(out_dir)
    except CheckpointError as e:  # as a checkpoint we fail to delete: disk space, not correctness
        print(f"warning: {e}: retention deletes nothing this time")
        return []
    deleted = doomed(steps, keep_last, keep_every, protect)
    for s in deleted:
        path = path_for(out_dir, s)
        try:
            if os.path.isdir(path):  # renamed away first: no half-deleted folder ever holds a final name
                os.rename(path, path + TMP_SUFFIX)
                path += TMP_SUFFIX
            _delete(path)
        except OSError as e:  # a checkpoint we failed to delete costs disk space, not correctness
            print(f"warning: cannot delete {e.filename}: {e.strerror}")
    return deleted


def remove_temporaries(out_dir):
    """Delete what a crash mid-save (or mid-prune) left behind; no reader ever looks at these."""
    for name in os.listdir(out_dir):
        if name.endswith(TMP_SUFFIX) and CKPT_NAME.fullmatch(name[:-len(TMP_SUFFIX)]):
            _delete(os.path.join(out_dir, name))


def _delete(path):
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def describe(out_dir):
    """(the checkpoints' lines under a header, else a line saying there is none; what else out_dir holds; all ok)."""
    lines = [f"{'step':>7}  {'written':19}  {'train loss':>10}  {'val loss':>8}  {'size':>10}  status"]
    origin = "scratch"
    for step in list_steps(out_dir):
        path = path_for(out_dir, step)
        size = 0
        state = {"written_at": 0.0}
        try:  # a live run may prune this file while we look
            size = sum(e.stat().st_size for e in os.scandir(path)) if os.path.isdir(path) else os.path.getsize(path)
            state["written_at"] = os.path.getmtime(path)
            status = "ok"
            state |= load(path, whole=False)
        except (FileNotFoundError, Vanished):
            continue
        except CheckpointError as e:
            status = str(e).split(": ", 1)[-1]
        except OSError as e:  # its time or size cannot be read: it cannot be verified either
            status = f"cannot read {e.filename}: {e.strerror}"
        origin = state.get("origin", origin)
        train, val = ("-" if state.get(k) is None else f"{state[k]:.4f}" for k in ("train_loss", "val_loss"))
        when = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(state["written_at"]))
        lines.append(f"{step:>7}  {when}  {train:>10}  {val:>8}  {size / 1e6:>7.1f} MB  {status}")
    names = sorted(entries(out_dir))
    nano = os.path.join(out_dir, NANOGPT_NAME)
    nanogpt = []
    if NANOGPT_NAME in names:
        nanogpt = [f"{NANOGPT_NAME} (python train.py --init_from={nano} starts a run from its weights, "
                   f"python sample.py --init_from={nano} samples it)"]
    notes = {"started from": [origin] if origin != "scratch" else [], "nanoGPT's checkpoint, not listed": nanogpt,
             "incomplete writes (ignored; train.py removes them when it next starts here)":
                 [n for n in names if n.endswith(TMP_SUFFIX) and CKPT_NAME.fullmatch(n[:-len(TMP_SUFFIX)])],
             "set aside by rewinds (each reads as an out_dir)": [n for n in names if n.startswith("abandoned-")]}
    all_ok = all(line.endswith("  ok") for line in lines[1:])
    if not lines[1:]:  # no header: what out_dir holds
        lines[0] = f"no checkpoint of this trainer in {out_dir}{'' if names else ' (an empty folder)'}"
    return "\n".join(lines + [f"{note}: {', '.join(found)}" for note, found in notes.items() if found]), all_ok


def to_file(source, target):
    """Write the checkpoint at source (a sharded run's folder, say) as one file: what a single process reads."""
    if os.path.exists(target):
        raise CheckpointError(f"{target} exists: name a new file")
    state = load(source)
    save(None, state["step"], state, path=target)
    return f"wrote {target} (step {state['step']}, from {source})"


if __name__ == "__main__":  # exit 0: every checkpoint verifies (or the file is written); 1: one does not; 2: error
    args = sys.argv[1:]
    usage = ("usage: python checkpoint.py <out_dir>   (lists its checkpoints and verifies each; exit 1 when one is "
             "damaged)\n       python checkpoint.py <checkpoint> <file.pt>   (writes a checkpoint as one file)")
    if args in (["--help"], ["-h"]):
        sys.exit(print(usage))
    try:
        if len(args) == 1 and is_url(args[0]):  # a bucket's: listed from a local copy of every step
            import objstore
            args = [objstore.local_copy(args[0])]
        if not (len(args) == 1 and os.path.isdir(args[0]) or len(args) == 2 and os.path.exists(args[0])):
            raise CheckpointError(f"{' '.join(args) or 'nothing'}: not an out_dir, nor a checkpoint and a new file")
        text, all_ok = (to_file(*args), True) if len(args) == 2 else describe(args[0])
    except CheckpointError as e:
        sys.exit(print(f"error: {e}", file=sys.stderr) or 2)
    sys.exit(print(text) or (0 if all_ok else 1))
