"""
A live run whose out_dir is s3://bucket/prefix (objstore.py talks to the store). The run writes its checkpoints
into a local staging folder (objstore.staging_dir) exactly as into any out_dir, so every local promise holds there;
a Mirror copies what is published to the bucket on a thread of its own, in order: a file as one object (a multipart
upload completes atomically), a sharded folder file by file with run.pt last, so that a step counts in the bucket
only once it is whole there (objstore.steps_in). Retention runs on the bucket's steps after each upload, so an older
step goes only once a newer one is up; a rewind copies the newer steps into abandoned-<time>/ and deletes them only
once every copy is complete. On an empty disk the bucket decides what to resume (Mirror.prepare): a step is
downloaded under its temporary name and checked before it gets its own; a damaged one is never loaded, an older one
is tried. A Lock (<prefix>/train.lock, a lease taken and renewed by conditional writes) keeps one run per prefix; S3
has no fencing, so a holder cut off from the store for longer than its lease may land one write after it was taken
over. The trainer's calls, in order: Mirror(...) (it takes the lock), prepare, opened once the run's folder is
ready, published, metrics_changed and check as the loop goes, close (or leaving it as a context manager).
"""
import contextlib
import email.utils
import json
import os
import re
import socket
import threading
import time
import uuid
from queue import Queue

import checkpoint
import objstore
from logs import metrics_path

LOCK_NAME = "train.lock"  # as outdir's, in the prefix
LEASE_S = 60.0  # a lock not renewed for this long is a dead run's; its holder renews it every LEASE_S / 12
SESSION_NAME = "remote-session"  # in a staging folder: the lock token of the run that last wrote there
METRICS_EVERY_S = 30.0  # metrics.jsonl goes up at most this often, and after every checkpoint
LOST_CODES = ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "404")  # a conditional write refused


def this_machine():
    """Host, boot and pid namespace: processes alike in all three see each other's pids (Linux; None elsewhere)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f"{socket.gethostname()} {f.read().strip()} {os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, OverflowError):  # another user's, or a pid that is no number: not ours to judge
        return True
    return True


def holder_line(holder):
    if "host" not in holder:
        return "a lock object this trainer did not write"
    return f"host {holder['host']}, pid {holder.get('pid')}, since {holder.get('since')}"


def unused_name(name, taken):
    """name, else name-2, name-3...: the first that taken(name) says is free (two set-asides within one second)."""
    candidate = name
    n = 1
    while taken(candidate):
        n += 1
        candidate = f"{name}-{n}"
    return candidate


class Lock:
    """One run per prefix: <prefix>/train.lock, a JSON object naming its holder (host, pid, since) with a token of
    its own, created with If-None-Match: * and changed only with If-Match on the ETag last seen, so that two runs
    never both take it. The holder renews it every lease_s / 12. Another run takes it over once it is free, once its
    holder is a dead process of this machine, or once it has gone lease_s without renewal (by the store's clock, or
    as watched); a live holder is refused in one line naming it. Released, the object stays, marked free, naming the
    run that held it last: acquire returns that run's record (`previous`, which Mirror.prepare compares)."""

    def __init__(self, store, lease_s=LEASE_S):
        self.store = store
        self.lease_s = lease_s
        self.token = uuid.uuid4().hex  # this run's alone: a record that carries it is a write of ours
        self.since = time.strftime("%Y-%m-%d %H:%M:%S")
        self.etag = None  # of our last write that the store took; None: not held
        self.lost = None  # why this run no longer holds the lock, the line ensure raises
        self.renewed = 0.0  # time.monotonic() of the last renewal that the store took
        self.mutex = threading.Lock()  # renewals come from the renewing thread and from the mirror's writes
        self.stop_renewing = threading.Event()

    def body(self, state):
        return {"state": state, "host": socket.gethostname(), "pid": os.getpid(), "since": self.since,
                "machine": this_machine(), "token": self.token, "lease_s": self.lease_s, "renewed": time.time()}

    def read(self):
        """(the lock's record, or None when there is none; its ETag; its age in seconds by the store's clock)."""
        def fetch():  # the body read inside the retried call: a connection lost mid-body is retried too
            reply = self.store.client.get_object(Bucket=self.store.bucket, Key=self.store.key(LOCK_NAME))
            return reply, reply["Body"].read()
        try:
            reply, data = self.store.call(fetch)
        except self.store.client_error as e:
            if objstore.error_code(e) in ("NoSuchKey", "404"):
                return None, None, 0.0
            raise
        # the store's Date against its LastModified: machines' clocks may disagree, the store's agrees with itself
        date = reply["ResponseMetadata"]["HTTPHeaders"].get("date")
        age = 0.0
        if date:
            age = (email.utils.parsedate_to_datetime(date) - reply["LastModified"]).total_seconds()
        try:
            holder = json.loads(data)
        except ValueError:
            holder = None
        if not isinstance(holder, dict):  # not our JSON: held by something unknown, never taken for free
            holder = {"state": "unreadable"}
        return holder, reply["ETag"], age

    def swap(self, state, **condition):
        """Write the lock as ours, in `state`, if it is still as `condition` says: its new ETag, or None. A write
        whose reply was lost (retried, it meets its own ETag: PreconditionFailed) is known as ours by its contents."""
        mine = self.body(state)
        try:
            return self.store.put_bytes(LOCK_NAME, json.dumps(mine).encode(), **condition)
        except self.store.client_error as e:
            if objstore.error_code(e) not in LOST_CODES:
                raise
        holder, etag, _ = self.read()
        if holder == mine:
            return etag
        return None

    def acquire(self, log=print):
        """Take the lock and start renewing it; CheckpointError naming the holder when a live run has it."""
        watched_etag = None  # the holder's ETag when we began to watch it for a renewal
        watched_since = time.monotonic()
        with self.store.errors("cannot lock"):
            while True:
                holder, etag, age = self.read()
                lease = self.lease_s
                if holder and isinstance(holder.get("lease_s"), (int, float)):
                    lease = holder["lease_s"]  # the holder renews by its own lease, not ours
                free = holder is None or holder.get("state") == "free"
                here = not free and this_machine() is not None and holder.get("machine") == this_machine()
                dead = here and not alive(holder.get("pid"))
                # stale by the store's clock, or unchanged for a whole lease while we watched it
                stale = age > lease or (etag == watched_etag and time.monotonic() - watched_since > lease)
                if not (free or dead or stale):
                    renewed_while_watched = watched_etag is not None and etag != watched_etag
                    if here or renewed_while_watched:  # a live process of this machine, or a run renewing it
                        raise checkpoint.CheckpointError(f"out_dir {self.store.url} is in use by another run "
                                                         f"({holder_line(holder)}); wait for it to end, or pass "
                                                         f"another out_dir")
                    if watched_etag is None:
                        log(f"{self.store.url} is locked by {holder_line(holder)}, renewed {age:.0f} s ago: "
                            f"waiting to see it renewed (then refused) or not for {lease:.0f} s (then taken over)")
                        watched_etag = etag
                        watched_since = time.monotonic()
                    time.sleep(min(lease / 24, 1.0))
                    continue
                if holder is None:
                    condition = {"IfNoneMatch": "*"}  # created only if no other run created it meanwhile
                else:
                    condition = {"IfMatch": etag}  # replaced only if no other run wrote it since we read it
                taken = self.swap("held", **condition)
                if not taken:  # another run wrote it between our read and our write: read it again
                    continue
                if dead:
                    log(f"warning: {self.store.url}: took over the lock of {holder_line(holder)}, a process that "
                        f"is gone")
                elif not free:
                    log(f"warning: {self.store.url}: took over the lock of {holder_line(holder)}, not renewed for "
                        f"{max(age, lease):.0f} s")
                self.etag = taken
                self.renewed = time.monotonic()
                threading.Thread(target=self.renew_loop, daemon=True).start()
                return holder

    def renew(self):
        """Write the lock anew, the holder's heartbeat; CheckpointError (kept in `lost`) once this run lost it."""
        with self.mutex:
            if self.lost is None and self.etag is not None:
                # the lease counts from before the write: the store may have dated it at any moment of it
                began = time.monotonic()
                etag = None
                try:
                    with self.store.errors("cannot renew the lock of"):
                        etag = self.swap("held", IfMatch=self.etag)
                        if etag is None:
                            holder = self.read()[0]
                            taker = holder_line(holder) if holder else "or deleted"
                            self.lost = (f"the lock of {self.store.url} was taken over by another run ({taker}): "
                                         f"stopped without writing there")
                except checkpoint.CheckpointError as e:
                    self.lost = str(e)
                self.etag = etag
                self.renewed = began
            if self.lost is not None:
                raise checkpoint.CheckpointError(self.lost)

    def renew_loop(self):
        while not self.stop_renewing.wait(self.lease_s / 12) and self.lost is None:
            with contextlib.suppress(checkpoint.CheckpointError):  # kept in `lost`: the mirror's next write stops
                self.renew()

    def ensure(self):
        """Before each write: CheckpointError once the lock is lost; renewed first when its lease is half gone (the
        renewing thread late, or waiting on the store), so that no write goes out on a lease that may have passed."""
        if self.lost is not None or time.monotonic() - self.renewed > self.lease_s / 2:
            self.renew()

    def release(self, free=True):
        """Stop renewing; with free, mark the lock free. Left as it is, it lapses: the next run of this machine
        takes it over at once, any other once lease_s have passed."""
        self.stop_renewing.set()
        with self.mutex:
            if free and self.etag is not None and self.lost is None:
                # a failure is no error: the lock then lapses, which is as safe (Mirror.close has stopped retries)
                with contextlib.suppress(checkpoint.CheckpointError), self.store.errors("cannot release"):
                    self.swap("free", IfMatch=self.etag)
            self.etag = None


def verify(path, step):
    """CheckpointError unless the checkpoint at path (a temporary name, say) is whole and holds `step`."""
    state = checkpoint.load(path, whole=False)
    if state["step"] != step:
        raise checkpoint.CheckpointError(f"checkpoint {path} is unusable: it holds step {state['step']!r}, not {step}")


def set_aside(folder, steps):
    """Move steps' checkpoints and metrics.jsonl into a new abandoned-<time>/ of folder (as a rewind would)."""
    stamp = time.strftime("abandoned-%Y%m%d-%H%M%S")
    aside = os.path.join(folder, unused_name(stamp, lambda name: os.path.exists(os.path.join(folder, name))))
    os.makedirs(aside)
    for path in [checkpoint.path_for(folder, s) for s in steps] + [metrics_path(folder)]:
        if os.path.exists(path):
            os.replace(path, os.path.join(aside, os.path.basename(path)))
    return aside


class Mirror:
    """A live run's copy in the bucket (see the module's docstring): made, it holds the prefix's lock; a context
    manager, leaving it closes it."""

    def __init__(self, url, keep_last, keep_every, log=print, give_up_s=objstore.GIVE_UP_S, lease_s=LEASE_S):
        self.store = objstore.Store(url, give_up_s, log)
        self.url = self.store.url
        self.log = log
        self.staging = objstore.staging_dir(url)
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.lock = Lock(self.store, lease_s)
        self.previous = self.lock.acquire(log)  # the lock's last holder: None, or its record
        self.bucket_steps = {}  # the bucket's whole steps, {step: 'file' or 'folder'}
        self.unsent = []  # this run's steps in the staging folder that the bucket lacks (a kill before they went up)
        self.tasks = Queue()  # (method, *arguments) for the mirror's thread, in order; None ends it
        self.thread = None
        self.failed = None  # the line check raises once a task has failed; no task runs after one
        self.metrics_sent_at = 0.0  # time.monotonic() when metrics.jsonl last went up

    def prepare(self, requested, warn=print):
        """Make the staging folder hold the step to resume: (the folder, the step; 0 for none). requested, as
        from_checkpoint_step: -1 the newest whole step that verifies (a damaged one is warned about, an older one
        tried), N exactly N, 0 none. When the run that held the lock last wrote the staging folder (a kill on this
        machine), it is this run's: its steps the bucket lacks are uploaded by opened. Else it is another
        timeline's: what it holds is set aside into its own abandoned-<time>/, and the bucket decides."""
        with self.store.errors("cannot resume from"):
            os.makedirs(self.staging, exist_ok=True)
            listing = self.store.listing()
            self.bucket_steps = objstore.steps_in(listing)
            marker = os.path.join(self.staging, SESSION_NAME)
            previous_token = self.previous.get("token") if self.previous is not None else None
            staging_is_ours = self.previous is not None and objstore.read_json(marker, None) == previous_token
            local = checkpoint.list_steps(self.staging)
            if not staging_is_ours and (local or os.path.exists(metrics_path(self.staging))):
                aside = set_aside(self.staging, local)
                warn(f"warning: {self.staging} is not what {self.url} holds now (another run wrote there since): "
                     f"moved what it held into {aside}")
                local = []
            objstore.write_json(marker, self.lock.token)
            self.unsent = [s for s in local if s not in self.bucket_steps]
            if "metrics.jsonl" in listing and not os.path.exists(metrics_path(self.staging)):
                self.store.get("metrics.jsonl", metrics_path(self.staging) + ".tmp")
                os.replace(metrics_path(self.staging) + ".tmp", metrics_path(self.staging))
            if requested == 0:
                return self.staging, 0
            steps = sorted(set(self.bucket_steps) | set(local))
            if requested > 0 and requested not in steps:
                available = ", ".join(map(str, steps)) or "none"
                raise checkpoint.CheckpointError(f"no checkpoint for step {requested} in {self.url} "
                                                 f"(steps available: {available})")
            candidates = [requested] if requested > 0 else reversed(steps)
            problems = []
            for step in candidates:
                try:
                    if step in local:
                        verify(checkpoint.path_for(self.staging, step), step)
                    else:
                        self.fetch(step, listing)
                    return self.staging, step
                except (checkpoint.Vanished, checkpoint.ReadError):  # no damage: the run stops, nothing set aside
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
        final = checkpoint.path_for(self.staging, step, self.bucket_steps[step] == "folder")
        tmp = final + checkpoint.TMP_SUFFIX  # what a kill leaves here, remove_temporaries deletes
        objstore.remove(tmp)
        for name in objstore.objects(listing, step, self.bucket_steps[step]):
            if "/" in name:  # a folder's file, ckpt_<step>/<file>
                self.store.get(name, os.path.join(tmp, name.partition("/")[2]))
            else:
                self.store.get(name, tmp)
        try:
            verify(tmp, step)
        except checkpoint.CheckpointError as e:
            objstore.remove(tmp)
            raise checkpoint.CheckpointError(str(e).replace(tmp, f"{self.url}/{os.path.basename(final)}")) from None
        os.replace(tmp, final)
        checkpoint.fsync_dir(self.staging)

    def rewinding(self, step):
        """Whether the bucket holds steps past `step` (opened sets them aside): a rewind, for wandb's run too."""
        return any(s > step for s in self.bucket_steps)

    def opened(self, step, abandoned=None, protect=()):
        """Once the staging folder is the run's (outdir.open_out_dir: cleaned, rewound to `step`): start mirroring.
        The bucket first: a killed run's leftovers removed, its steps past `step` moved into abandoned-<time>/
        (named as the local rewind's folder, `abandoned`, when there is one), this run's steps it lacks uploaded."""
        self.thread = threading.Thread(target=self.work, daemon=True)
        self.thread.start()
        self.tasks.put((self.open_bucket, step, abandoned, list(protect)))

    def published(self, path, protect=()):
        """After a checkpoint is published (and pruned) in the staging folder, path its file or folder: upload it,
        then retention on the bucket's steps (never those in protect), then metrics.jsonl. Returns at once."""
        self.tasks.put((self.upload, path, list(protect)))

    def metrics_changed(self):
        """After a line is added to metrics.jsonl: it goes up at most every METRICS_EVERY_S (and after checkpoints)."""
        if time.monotonic() - self.metrics_sent_at >= METRICS_EVERY_S:
            self.metrics_sent_at = time.monotonic()  # now, not once it is up: one task queued, not one a step
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
            self.store.stopping.set()  # what still runs fails at its next transient error, without retrying
            self.lock.release(free=wait and self.failed is None and self.lock.lost is None)

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        self.close(wait=kind is not KeyboardInterrupt)

    def work(self):
        """The mirror's thread: the tasks in order; once one has failed, the rest are skipped (uploaded out of order,
        a step could count in the bucket with an older one missing)."""
        while (task := self.tasks.get()) is not None:
            if self.failed is not None:
                continue
            method, *arguments = task
            try:
                with self.store.errors("cannot write to"):
                    method(*arguments)
            except Exception as e:  # a bug too: the run stops, in one line, rather than training unmirrored
                if isinstance(e, checkpoint.CheckpointError):
                    problem = str(e)
                else:
                    problem = f"{type(e).__name__}: {e}"
                newest = max(self.bucket_steps, default=None)
                newest_line = f"step {newest}" if newest else "no step"
                self.failed = objstore.scrub(f"{problem}; stopped: {newest_line} is the newest in the bucket, every "
                                             f"checkpoint in {self.staging}")

    def put(self, name, path):
        self.lock.ensure()
        self.store.put_file(name, path)

    def put_step(self, path, under=""):
        """Upload the checkpoint at path (a file, or a folder with run.pt last) as under + its name."""
        name = under + os.path.basename(path)
        if not os.path.isdir(path):
            return self.put(name, path)
        for file in sorted(os.listdir(path), key=lambda n: n == checkpoint.RUN_NAME):  # False sorts first
            self.put(f"{name}/{file}", os.path.join(path, file))

    def put_metrics(self):
        if os.path.exists(metrics_path(self.staging)):
            with open(metrics_path(self.staging), "rb") as f:
                data = f.read()
            self.lock.ensure()
            self.store.put_bytes("metrics.jsonl", data[:data.rfind(b"\n") + 1])  # whole lines: a write may be on
        self.metrics_sent_at = time.monotonic()

    def delete(self, step):
        """Delete step from the bucket: its file, or its folder's run.pt first (then it no longer counts)."""
        kind = self.bucket_steps.pop(step)
        folder_listing = {}
        if kind == "folder":
            folder_listing = self.store.listing(objstore.step_name(step, kind) + "/")
        names = objstore.objects(folder_listing, step, kind)
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
                folder_listing = self.store.listing(objstore.step_name(step, kind) + "/")
                self.store.delete(objstore.objects(folder_listing, step, kind))
            return
        self.bucket_steps[step] = kind
        for doomed in checkpoint.doomed(sorted(self.bucket_steps), self.keep_last, self.keep_every, protect):
            self.delete(doomed)
        self.put_metrics()

    def open_bucket(self, step, abandoned, protect):
        """opened's work, on the mirror's thread: the bucket cleaned, rewound to `step`, given this run's steps."""
        listing = self.store.listing()
        self.bucket_steps = objstore.steps_in(listing)
        whole = {n for s, kind in self.bucket_steps.items() for n in objstore.objects(listing, s, kind)}
        unfinished = [n for n in listing if re.match(r"ckpt_\d{7,}/", n) and n not in whole]  # folders sans run.pt
        self.lock.ensure()
        self.store.delete(unfinished)
        self.store.abort_uploads()
        newer = sorted(s for s in self.bucket_steps if s > step)
        if newer:
            self.rewind_bucket(step, newer, listing, abandoned)
        for s in self.unsent:
            if s <= step:
                self.upload(checkpoint.path_for(self.staging, s), protect)
        self.put_metrics()

    def rewind_bucket(self, step, newer, listing, abandoned):
        """Move the steps `newer` (past `step`) and metrics.jsonl into abandoned-<time>/: every one copied before
        the first is deleted, so that a failure midway loses nothing. With the local rewind's folder, `abandoned`:
        named as it, and given its steps that never went up and its metrics.jsonl."""
        if abandoned:
            stamp = os.path.basename(abandoned)
        else:
            stamp = time.strftime("abandoned-%Y%m%d-%H%M%S")
        name = unused_name(stamp, lambda candidate: any(key.startswith(candidate + "/") for key in listing))
        for s in newer:
            for key in objstore.objects(listing, s, self.bucket_steps[s]):
                self.lock.ensure()
                self.store.copy(key, f"{name}/{key}")
        if abandoned:
            for s in checkpoint.list_steps(abandoned):
                if s not in self.bucket_steps:
                    self.put_step(checkpoint.path_for(abandoned, s), name + "/")
        if abandoned and os.path.exists(metrics_path(abandoned)):
            self.put(f"{name}/metrics.jsonl", metrics_path(abandoned))
        elif "metrics.jsonl" in listing:
            self.store.copy("metrics.jsonl", f"{name}/metrics.jsonl")
        for s in newer:
            self.delete(s)
        noun = "steps" if len(newer) > 1 else "step"
        self.log(f"{self.url}: moved {noun} {', '.join(map(str, newer))} into {self.url}/{name}/ (rewound to step "
                 f"{step})")
