"""
Checkpoints written in the background, so that a save costs the loop only a copy of the state to host memory.
snapshot makes that copy (into buffers kept from one save to the next, pinned for a GPU's tensors, tied weights
kept tied); publish writes it with checkpoint.save and prunes the folder; a Saver does both on a thread of its own,
one save at a time, reports each, and raises a failed one in the loop a step later. Leaving a Saver (it is a
context manager) waits for the save in flight, unless Ctrl-C, then or meanwhile, cancels it: no file is left then.
A sharded run's Saver (sharded=True) runs on every rank: each has DCP write its shards into ckpt_<step>.tmp/ in the
background (the copy to host memory made first), and rank 0 then completes the folder (publish_folder) and prunes.
"""
import os
from concurrent.futures import ThreadPoolExecutor
from threading import Event

import torch
import torch.distributed as dist

import checkpoint


def snapshot(state, buffers=None):
    """A host copy of state's tensors (in nested dicts and lists), for a save to write while training goes on
    changing its own. With a dict of `buffers`, the copies land in the buffers of the last call (pinned when the
    source is on a GPU, so they copy at full speed); None makes new, unpinned ones. Tied weights stay tied."""
    pin = buffers is not None  # buffers kept from one save to the next are pinned; new ones are not
    if buffers is None:
        buffers = {}
    copies = {}  # a source tensor's copy, so that tied weights stay tied
    devices = set()

    def copy(obj, key):
        if isinstance(obj, torch.Tensor):
            source = (obj.untyped_storage().data_ptr(), obj.storage_offset(), obj.shape, obj.stride(), obj.dtype)
            if source not in copies:
                buf = buffers.get(key)
                if buf is None or buf.shape != obj.shape or buf.dtype != obj.dtype:
                    buf = torch.empty(obj.shape, dtype=obj.dtype, pin_memory=pin and obj.is_cuda)
                    buffers[key] = buf
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


def publish(out_dir, step, state, keep_last, keep_every, protect, cancel=None, guard=lambda: None):
    """save, then prune: all that a checkpoint costs, whether it runs in the foreground or the background. guard()
    runs before each, to refuse a folder that is no longer this run's (housekeeping.Guard)."""
    guard()
    written = []
    try:
        path = checkpoint.save(out_dir, step, state, cancel, written)
    except checkpoint.CheckpointError:
        guard()  # a folder deleted mid-save says so, rather than "no such file"
        raise
    try:
        guard()
    except checkpoint.CheckpointError:
        if guard.foreign() and checkpoint.same_file(path, written[0]):  # ours, in another run's folder
            os.remove(path)
        raise
    return path, checkpoint.prune(out_dir, keep_last, keep_every, protect)


def publish_folder(out_dir, step, written, info, keep_last, keep_every, protect, cancel, guard):
    """Once every rank's DCP files are in ckpt_<step>.tmp (`written`, DCP's future, done), rank 0 completes the
    folder: run.pt records the run and each file's CRC32 (save fsyncs it and the folder), then the folder takes its
    final name; then prune. A second Ctrl-C meanwhile deletes the folder instead."""
    import sharded  # a sharded run's alone: DCP's modules take seconds to import
    final = checkpoint.path_for(out_dir, step, folder=True)
    tmp = final + checkpoint.TMP_SUFFIX
    try:
        with sharded.unwrapped():  # every rank's shards, or the error one of them met
            written.result()
        guard()
        if cancel.is_set():
            raise checkpoint.SaveCancelled()
        lost = sharded.missing_shards(tmp)
        if lost:
            raise checkpoint.CheckpointError(f"{tmp} lacks {', '.join(lost)}: a sharded run's out_dir must be one "
                                             f"filesystem that every machine sees")
        checkpoint.save(None, step, info | {"checksums": sharded.checksums(tmp)}, cancel,
                        path=os.path.join(tmp, checkpoint.RUN_NAME))
        os.rename(tmp, final)
        checkpoint.fsync_dir(out_dir)
    except checkpoint.SaveCancelled:
        checkpoint.remove_temporaries(out_dir)
        raise
    except OSError as e:
        raise checkpoint.CheckpointError(f"cannot write checkpoint {e.filename or tmp}: {e.strerror}") from None
    guard()
    return final, checkpoint.prune(out_dir, keep_last, keep_every, protect)


class Saver:
    """Writes a run's checkpoints on its own thread, one at a time: save() waits only for the snapshot. A failed
    save raises at the next save(), poll() or finish(). cfg gives out_dir, retention (keep_last_checkpoints,
    keep_every) and async_checkpoint (False: save() returns once the checkpoint is on disk)."""

    def __init__(self, out_dir, cfg, guard, log=print, sharded=False, master=True, published=None):
        self.out_dir = out_dir
        self.keep_last = cfg["keep_last_checkpoints"]
        self.keep_every = cfg["keep_every"]
        self.wait = not cfg["async_checkpoint"]
        self.guard = guard  # outdir's check, before each write, that out_dir is still this run's
        self.log = log
        self.master = master  # rank 0: it publishes, and says what was saved
        # DCP's collectives run on its own thread: a gloo group of their own keeps them apart from training's
        self.group = dist.new_group(backend="gloo") if sharded else None
        self.thread = ThreadPoolExecutor(max_workers=1)
        self.cancel = Event()  # set by a second Ctrl-C: the save in flight is given up
        self.in_flight = None  # the future of the save being written
        self.buffers = {}  # host copies, kept from one save to the next
        self.published = published  # called on the thread with (path, protect) once a checkpoint is on disk

    def save(self, state, protect):
        """Checkpoint state["step"], never pruning the steps in `protect`."""
        self.finish()
        step = state["step"]
        if self.group is None:
            host = snapshot(state, self.buffers)
            self.in_flight = self.thread.submit(self.told, protect, publish, self.out_dir, step, host,
                                                self.keep_last, self.keep_every, protect, self.cancel, self.guard)
        else:  # every rank: DCP's own thread writes this rank's shards
            import torch.distributed.checkpoint as dcp  # a sharded run's alone: it takes seconds to import
            import sharded
            tmp = checkpoint.path_for(self.out_dir, step, folder=True) + checkpoint.TMP_SUFFIX
            written = dcp.async_save(sharded.tensors_of(state), checkpoint_id=tmp, process_group=self.group)
            if self.master:  # then rank 0 completes the folder
                self.in_flight = self.thread.submit(self.told, protect, publish_folder, self.out_dir, step, written,
                                                    sharded.run_info(state), self.keep_last, self.keep_every,
                                                    protect, self.cancel, self.guard)
            else:
                self.in_flight = written
        if self.wait:
            self.finish()

    def told(self, protect, write, *args):
        """write(*args), on the thread; then `published` hears of the checkpoint it put on disk."""
        path, pruned = write(*args)
        if self.published is not None:
            self.published(path, protect)
        return path, pruned

    def poll(self):
        """Report the save in flight if it has ended: a failure stops the run a step after it happened."""
        if self.in_flight is not None and self.in_flight.done():
            self.finish()

    def finish(self):
        """Wait for the save in flight, if any, and say what it did."""
        if self.in_flight is None:
            return
        future = self.in_flight
        self.in_flight = None
        if not self.master:  # the shards this rank wrote: rank 0 says what was saved
            import sharded  # only a sharded run has ranks other than 0 saving
            try:
                with sharded.unwrapped():
                    future.result()
            except OSError as e:
                raise checkpoint.CheckpointError(f"cannot write checkpoint {e.filename or self.out_dir}: "
                                                 f"{e.strerror}") from None
            return
        path, pruned = future.result()
        line = f"saved {path}"
        if pruned:
            steps = "steps" if len(pruned) > 1 else "step"
            line += (f"; retention deleted {steps} {', '.join(map(str, pruned))} "
                     f"(keep_last_checkpoints={self.keep_last})")
        self.log(line)

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        try:
            if kind is KeyboardInterrupt:
                self.cancel.set()
            self.thread.shutdown()
        except KeyboardInterrupt:  # Ctrl-C while waiting for the save: give it up
            self.cancel.set()
            self.thread.shutdown()
            raise
