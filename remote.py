"""
A run whose out_dir is an object-store URL, s3://bucket/prefix (objstore.py talks to the store). The run writes its
checkpoints into a local staging folder (objstore.staging_dir) exactly as into any out_dir, so every local promise
holds there, and a Mirror copies what is published to the bucket on a thread of its own, in order: a file as one
object (a multipart upload completes atomically), a sharded folder file by file with run.pt last, so that a step
counts in the bucket only once it is whole there (steps_in). Retention runs on the bucket's steps after each upload,
so an older step goes only once a newer one is up; a rewind copies the newer steps into abandoned-<time>/ and deletes
them only once every copy is complete. On an empty disk the bucket decides what to resume (Mirror.prepare): the step
is downloaded under its temporary name, its CRC32s checked, then renamed; a damaged one is never loaded, an older one
is tried. The lock (objlock.py) keeps one run per prefix. The trainer's calls, in order: Mirror(...) (it takes
the lock), prepare, opened once the run's folder is ready, published, metrics_changed and check as the loop goes,
close (or leaving it as a context manager).
"""
import os
import re
import threading
import time
from queue import Queue

import checkpoint
import objlock
import objstore
from logs import metrics_path

SESSION_NAME = "remote-session"  # in a staging folder: the lock token of the run that last wrote there
METRICS_EVERY_S = 30.0  # metrics.jsonl goes up at most this often, and after every checkpoint


def doomed(steps, keep_last, keep_every, protect):
    """checkpoint.prune's choice, made on the bucket's steps (oldest first)."""
    if keep_last == 0 or not steps:
        return []
    keep = set(steps[-keep_last:]) | set(protect) | {steps[-1]}
    return [s for s in steps if s not in keep and not (keep_every and s % keep_every == 0)]


def verify(path, step):
    """CheckpointError unless the checkpoint at path (a temporary name, say) is whole and holds `step`."""
    state = checkpoint.load(path, whole=False)
    if state["step"] != step:
        raise checkpoint.CheckpointError(f"checkpoint {path} is unusable: it holds step {state['step']!r}, not {step}")


def set_aside(folder, steps):
    """Move steps' checkpoints and metrics.jsonl into a new abandoned-<time>/ of folder (as a rewind would)."""
    aside = os.path.join(folder, time.strftime("abandoned-%Y%m%d-%H%M%S"))
    n = 1
    while os.path.exists(aside + (f"-{n}" if n > 1 else "")):
        n += 1
    aside += f"-{n}" if n > 1 else ""
    os.makedirs(aside)
    for path in [checkpoint.path_for(folder, s) for s in steps] + [metrics_path(folder)]:
        if os.path.exists(path):
            os.replace(path, os.path.join(aside, os.path.basename(path)))
    return aside


class Mirror:
    """A live run's copy in the bucket (see the module's docstring): made, it holds the prefix's lock; a context
    manager, leaving it closes it."""

    def __init__(self, url, keep_last, keep_every, log=print, give_up_s=objstore.GIVE_UP_S, lease_s=objlock.LEASE_S):
        self.store = objstore.Store(url, give_up_s, log)
        self.url, self.log = self.store.url, log
        self.staging = objstore.staging_dir(url)
        self.keep_last, self.keep_every = keep_last, keep_every
        self.lock = objlock.Lock(self.store, lease_s)
        self.previous = self.lock.acquire(log)  # the lock's last holder: None, or its record
        self.remote, self.ours = {}, []  # the bucket's whole steps {step: kind}; this run's steps it lacks
        self.tasks, self.thread = Queue(), None
        self.failed, self.metrics_at = None, 0.0  # failed: the line the loop raises at its next check

    def prepare(self, requested, warn=print):
        """Make the staging folder hold the step to resume: (the folder, the step; 0 for none). requested, as
        from_checkpoint_step: -1 the newest whole step that verifies (a damaged one is warned about, an older one
        tried), N exactly N, 0 none. When the run that held the lock last wrote the staging folder (a kill on this
        machine), it is this run's: its steps the bucket lacks are uploaded by opened. Else it is another
        timeline's: what it holds is set aside into its own abandoned-<time>/, and the bucket decides."""
        with self.store.errors("cannot resume from"):
            os.makedirs(self.staging, exist_ok=True)
            listing = self.store.listing()
            self.remote = objstore.steps_in(listing)
            marker = os.path.join(self.staging, SESSION_NAME)
            mine = self.previous is not None and objstore.read_json(marker, None) == self.previous.get("token")
            local = checkpoint.list_steps(self.staging)
            if not mine and (local or os.path.exists(metrics_path(self.staging))):
                warn(f"warning: {self.staging} is not what {self.url} holds now (another run wrote there since): "
                     f"moved what it held into {set_aside(self.staging, local)}")
                local = []
            objstore.write_json(marker, self.lock.token)
            self.ours = [s for s in local if s not in self.remote]
            if "metrics.jsonl" in listing and not os.path.exists(metrics_path(self.staging)):
                self.store.get("metrics.jsonl", metrics_path(self.staging) + ".tmp")
                os.replace(metrics_path(self.staging) + ".tmp", metrics_path(self.staging))
            if requested == 0:
                return self.staging, 0
            steps = sorted(set(self.remote) | set(local))
            if requested > 0 and requested not in steps:
                raise checkpoint.CheckpointError(f"no checkpoint for step {requested} in {self.url} "
                                                 f"(steps available: {', '.join(map(str, steps)) or 'none'})")
            problems = []
            for step in [requested] if requested > 0 else reversed(steps):
                try:
                    if step in local:
                        verify(checkpoint.path_for(self.staging, step), step)
                    else:
                        self.fetch(step, listing)
                    return self.staging, step
                except (checkpoint.Vanished, checkpoint.ReadError):
                    raise
                except checkpoint.CheckpointError as e:
                    if requested > 0:
                        raise
                    warn(f"warning: {e}; trying an older one")
                    problems.append(f"step {step}: {str(e).split(': ', 1)[-1]}")
            if problems:
                raise checkpoint.CheckpointError(f"no usable checkpoint in {self.url} ({'; '.join(problems)}); "
                                                 f"--from_checkpoint_step=0 starts over and sets them aside")
            return self.staging, 0

    def fetch(self, step, listing):
        """Download step into the staging folder under its temporary name, check it, then give it its own."""
        final = checkpoint.path_for(self.staging, step, self.remote[step] == "folder")
        tmp = final + checkpoint.TMP_SUFFIX  # what a kill leaves here, remove_temporaries deletes
        objstore.remove(tmp)
        for name in objstore.objects(listing, step, self.remote[step]):
            self.store.get(name, os.path.join(tmp, name.partition("/")[2]) if "/" in name else tmp)
        try:
            verify(tmp, step)
        except checkpoint.CheckpointError as e:
            objstore.remove(tmp)
            raise checkpoint.CheckpointError(str(e).replace(tmp, f"{self.url}/{os.path.basename(final)}")) from None
        os.replace(tmp, final)
        checkpoint.fsync_dir(self.staging)

    def rewinding(self, step):
        """Whether the bucket holds steps past `step` (opened sets them aside): a rewind, for wandb's run too."""
        return any(s > step for s in self.remote)

    def opened(self, step, abandoned=None, protect=()):
        """Once the staging folder is the run's (outdir.open_out_dir: cleaned, rewound to `step`): start mirroring.
        The bucket first: a killed run's leftovers removed, its steps past `step` moved into abandoned-<time>/
        (named as the local rewind's folder, `abandoned`, when there is one), this run's steps it lacks uploaded."""
        self.thread = threading.Thread(target=self.work, daemon=True)
        self.thread.start()
        self.tasks.put((self.open, step, abandoned, list(protect)))

    def published(self, path, protect=()):
        """After a checkpoint is published (and pruned) in the staging folder, path its file or folder: upload it,
        then retention on the bucket's steps (never those in protect), then metrics.jsonl. Returns at once."""
        self.tasks.put((self.upload, path, list(protect)))

    def metrics_changed(self):
        """After a line is added to metrics.jsonl: it goes up at most every METRICS_EVERY_S (and after checkpoints)."""
        if time.monotonic() - self.metrics_at >= METRICS_EVERY_S:
            self.metrics_at = time.monotonic()
            self.tasks.put((self.put_metrics,))

    def check(self):
        """Between steps: CheckpointError, one line, once the mirror has failed or the lock is lost."""
        if self.failed or self.lock.lost:
            raise checkpoint.CheckpointError(self.failed or self.lock.lost)

    def close(self, wait=True):
        """Wait for the uploads (wait=False: abandon them), then let go of the lock: freed when all is in the
        bucket, else left to lapse, so that the next run of this machine takes it at once and uploads the rest. The
        lock is written once, without retries: a store that does not answer then has the lock lapse."""
        if self.thread is not None and wait:
            self.tasks.put((self.put_metrics,))
        self.tasks.put(None)
        try:
            if self.thread is not None and wait:
                self.thread.join()
        except KeyboardInterrupt:
            wait = False
            raise
        finally:
            self.store.stopping.set()
            self.lock.release(free=wait and self.failed is None and self.lock.lost is None)

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        self.close(wait=kind is not KeyboardInterrupt)

    def work(self):
        while (task := self.tasks.get()) is not None:
            if self.failed is None:
                try:
                    with self.store.errors("cannot write to"):
                        task[0](*task[1:])
                except Exception as e:  # a bug too: the run stops, in one line, rather than training unmirrored
                    problem = str(e) if isinstance(e, checkpoint.CheckpointError) else f"{type(e).__name__}: {e}"
                    newest = max(self.remote, default=None)
                    self.failed = objstore.scrub(f"{problem}; stopped: {f'step {newest}' if newest else 'no step'} "
                                                 f"is the newest in the bucket, every checkpoint in {self.staging}")

    def put(self, name, path):
        self.lock.ensure()
        self.store.put_file(name, path)

    def put_step(self, path, under=""):
        """Upload the checkpoint at path (a file, or a folder with run.pt last) as under + its name."""
        name = under + os.path.basename(path)
        if not os.path.isdir(path):
            return self.put(name, path)
        for file in sorted(os.listdir(path), key=lambda n: n == checkpoint.RUN_NAME):
            self.put(f"{name}/{file}", os.path.join(path, file))

    def put_metrics(self):
        if os.path.exists(metrics_path(self.staging)):
            with open(metrics_path(self.staging), "rb") as f:
                data = f.read()
            self.lock.ensure()
            self.store.put_bytes("metrics.jsonl", data[:data.rfind(b"\n") + 1])  # whole lines: a write may be on
        self.metrics_at = time.monotonic()

    def delete(self, step):
        """Delete step from the bucket: its file, or its folder's run.pt first (then it no longer counts)."""
        kind = self.remote.pop(step)
        names = objstore.objects(self.store.listing(f"ckpt_{step:07d}/") if kind == "folder" else {}, step, kind)
        self.lock.ensure()
        self.store.delete(names[-1:])
        self.store.delete(names[:-1])

    def upload(self, path, protect):
        step = int(checkpoint.CKPT_NAME.fullmatch(os.path.basename(path)).group(1))
        kind = "folder" if os.path.isdir(path) else "file"
        try:
            self.put_step(path)
        except FileNotFoundError:  # pruned here before it could go up: a newer step follows it
            if kind == "folder":  # what went up of it, without its run.pt
                self.store.delete(objstore.objects(self.store.listing(f"ckpt_{step:07d}/"), step, kind))
            return
        self.remote[step] = kind
        for s in doomed(sorted(self.remote), self.keep_last, self.keep_every, protect):
            self.delete(s)
        self.put_metrics()

    def open(self, step, abandoned, protect):
        listing = self.store.listing()
        self.remote = objstore.steps_in(listing)
        whole = {n for s, kind in self.remote.items() for n in objstore.objects(listing, s, kind)}
        self.lock.ensure()
        self.store.delete([n for n in listing if re.match(r"ckpt_\d{7,}/", n) and n not in whole])
        self.store.abort_uploads()
        newer = sorted(s for s in self.remote if s > step)
        if newer:
            name = os.path.basename(abandoned) if abandoned else time.strftime("abandoned-%Y%m%d-%H%M%S")
            n = 1
            while any(key.startswith(name + (f"-{n}/" if n > 1 else "/")) for key in listing):
                n += 1
            name += f"-{n}" if n > 1 else ""
            for s in newer:  # copied, every one of them, before the first is deleted
                for key in objstore.objects(listing, s, self.remote[s]):
                    self.lock.ensure()
                    self.store.copy(key, f"{name}/{key}")
            for s in checkpoint.list_steps(abandoned) if abandoned else []:  # the local rewind's, that never went up
                if s not in self.remote:
                    self.put_step(checkpoint.path_for(abandoned, s), name + "/")
            if abandoned and os.path.exists(metrics_path(abandoned)):
                self.put(f"{name}/metrics.jsonl", metrics_path(abandoned))
            elif "metrics.jsonl" in listing:
                self.store.copy("metrics.jsonl", f"{name}/metrics.jsonl")
            for s in newer:
                self.delete(s)
            self.log(f"{self.url}: moved {'steps' if len(newer) > 1 else 'step'} {', '.join(map(str, newer))} into "
                     f"{self.url}/{name}/ (rewound to step {step})")
        for s in self.ours:
            if s <= step:
                self.upload(checkpoint.path_for(self.staging, s), protect)
        self.put_metrics()
