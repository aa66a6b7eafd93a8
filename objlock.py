"""
One run per object-store prefix: the Lock object <prefix>/train.lock (what outdir.lock is for a folder), a JSON
record of its holder taken and changed only by conditional writes (If-None-Match: *, then If-Match on the ETag last
seen), so that two runs never both take it, and renewed by its holder as a lease, so that a killed run's lock
blocks nobody for long: a dead process of this machine holds nothing, a run elsewhere nothing once lease_s pass
without renewal. A live holder is refused in one line naming it. Writes check the lease first (ensure); S3 has no
fencing, so a holder cut off from the store for longer than lease_s may land one write after it was taken over.
"""
import contextlib
import email.utils
import json
import os
import socket
import threading
import time
import uuid

import checkpoint
from objstore import code

LOCK_NAME = "train.lock"  # as outdir's, in the prefix
LEASE_S = 60.0  # a lock not renewed for this long is a dead run's; its holder renews it every LEASE_S / 12


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


class Lock:
    """One run per prefix: <prefix>/train.lock, a JSON object naming its holder (host, pid, since) with a token of
    its own, created with If-None-Match: * and changed only with If-Match on the ETag last seen, so that two runs
    never both take it. The holder renews it every lease_s / 12. Another run takes it over once it is free, once its
    holder is a dead process of this machine, or once it has gone lease_s without renewal (by the store's clock, or
    as watched); a live holder is refused in one line naming it. Released, the object stays, marked free, naming the
    run that held it last: acquire returns that run's record (`previous`, which Mirror.prepare compares)."""

    def __init__(self, store, lease_s=LEASE_S):
        self.store, self.lease_s = store, lease_s
        self.token, self.since = uuid.uuid4().hex, time.strftime("%Y-%m-%d %H:%M:%S")
        self.etag, self.lost = None, None  # lost: why this run no longer holds the lock
        self.renewed = 0.0  # time.monotonic() of the last renewal that the store took
        self.mutex, self.stop = threading.Lock(), threading.Event()

    def body(self, state):
        return {"state": state, "host": socket.gethostname(), "pid": os.getpid(), "since": self.since,
                "machine": this_machine(), "token": self.token, "lease_s": self.lease_s, "renewed": time.time()}

    def read(self):
        """(the lock's record, or None when there is none; its ETag; its age in seconds by the store's clock)."""
        def fetch():
            reply = self.store.client.get_object(Bucket=self.store.bucket, Key=self.store.key(LOCK_NAME))
            return reply, reply["Body"].read()
        try:
            reply, data = self.store.call(fetch)
        except self.store.client_error as e:
            if code(e) in ("NoSuchKey", "404"):
                return None, None, 0.0
            raise
        date = reply["ResponseMetadata"]["HTTPHeaders"].get("date")
        age = (email.utils.parsedate_to_datetime(date) - reply["LastModified"]).total_seconds() if date else 0.0
        try:
            holder = json.loads(data)
        except ValueError:
            holder = None
        return holder if isinstance(holder, dict) else {"state": "unreadable"}, reply["ETag"], age

    def swap(self, state, **condition):
        """Write the lock as ours, in `state`, if it is still as `condition` says: its new ETag, or None. A write
        whose reply was lost (retried, it meets its own ETag: PreconditionFailed) is known as ours by its contents."""
        mine = self.body(state)
        try:
            return self.store.put_bytes(LOCK_NAME, json.dumps(mine).encode(), **condition)
        except self.store.client_error as e:
            if code(e) not in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "404"):
                raise
        holder, etag, _ = self.read()
        return etag if holder == mine else None

    def acquire(self, log=print):
        """Take the lock and start renewing it; CheckpointError naming the holder when a live run has it."""
        watched, since = None, time.monotonic()
        with self.store.errors("cannot lock"):
            while True:
                holder, etag, age = self.read()
                lease = holder.get("lease_s") if holder else None
                lease = lease if isinstance(lease, (int, float)) else self.lease_s
                free = holder is None or holder.get("state") == "free"
                here = not free and this_machine() is not None and holder.get("machine") == this_machine()
                dead = here and not alive(holder.get("pid"))
                stale = age > lease or (etag == watched and time.monotonic() - since > lease)
                if not (free or dead or stale):
                    if here or (watched is not None and etag != watched):  # alive, or renewed as we watched
                        raise checkpoint.CheckpointError(f"out_dir {self.store.url} is in use by another run "
                                                         f"({holder_line(holder)}); wait for it to end, or pass "
                                                         f"another out_dir")
                    if watched is None:
                        log(f"{self.store.url} is locked by {holder_line(holder)}, renewed {age:.0f} s ago: "
                            f"waiting to see it renewed (then refused) or not for {lease:.0f} s (then taken over)")
                        watched, since = etag, time.monotonic()
                    time.sleep(min(lease / 24, 1.0))
                    continue
                taken = self.swap("held", **({"IfNoneMatch": "*"} if holder is None else {"IfMatch": etag}))
                if taken:
                    if not free:
                        log(f"warning: {self.store.url}: took over the lock of {holder_line(holder)}, "
                            + ("a process that is gone" if dead else f"not renewed for {max(age, lease):.0f} s"))
                    self.etag, self.renewed = taken, time.monotonic()
                    threading.Thread(target=self.renew_loop, daemon=True).start()
                    return holder

    def renew(self):
        """Write the lock anew, the holder's heartbeat; CheckpointError (kept in `lost`) once this run lost it."""
        with self.mutex:
            if self.lost is None and self.etag is not None:
                began = time.monotonic()
                try:
                    with self.store.errors("cannot renew the lock of"):
                        etag = self.swap("held", IfMatch=self.etag)
                        if etag is None:
                            holder = self.read()[0]
                            self.lost = (f"the lock of {self.store.url} was taken over by another run "
                                         f"({holder_line(holder) if holder else 'or deleted'}): stopped without "
                                         f"writing there")
                except checkpoint.CheckpointError as e:
                    self.lost = str(e)
                self.etag, self.renewed = etag if self.lost is None else None, began
            if self.lost is not None:
                raise checkpoint.CheckpointError(self.lost)

    def renew_loop(self):
        while not self.stop.wait(self.lease_s / 12) and self.lost is None:
            with contextlib.suppress(checkpoint.CheckpointError):
                self.renew()

    def ensure(self):
        """Before each write: CheckpointError once the lock is lost; renewed first when its lease is half gone."""
        if self.lost is not None or time.monotonic() - self.renewed > self.lease_s / 2:
            self.renew()

    def release(self, free=True):
        """Stop renewing; with free, mark the lock free. Left as it is, it lapses: the next run of this machine
        takes it over at once, any other once lease_s have passed."""
        self.stop.set()
        with self.mutex:
            if free and self.etag is not None and self.lost is None:
                with contextlib.suppress(checkpoint.CheckpointError), self.store.errors("cannot release"):
                    self.swap("free", IfMatch=self.etag)
            self.etag = None
