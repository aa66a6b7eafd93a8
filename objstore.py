"""
An object store's prefix, s3://bucket/prefix, as a run's out_dir, through boto3 (an optional extra: a URL without it
is one line naming the package): the URL and the local folders that belong to it (staging_dir, a live run's;
read_dir, readers'); a Store whose every call is retried with exponential backoff while the store's errors are
transient (said once an outage), giving up after give_up_s; every error one line with no secret in it (scrub: the
credentials in use, a URL's userinfo, a signature), as a CheckpointError. A step counts in the bucket once it is
whole there: its file, or its folder's run.pt, uploaded last (steps_in). Readers (find_to_read, local_copy) download
into a read cache of their own, never a run's staging folder; a step deleted while they read is not damage. The
lock is objlock.py's; a live run's mirror, remote.py's.
"""
import contextlib
import json
import os
import re
import shutil
import sys
import threading
import time
import uuid

import checkpoint
from configurator import ConfigError

GIVE_UP_S = 600.0  # how long an unreachable store is retried before the run stops
READ_GIVE_UP_S = 60.0  # before a reader (sample.py, checkpoint.py) does
STEP_KEY = re.compile(r"ckpt_(\d{7,})(\.pt|/run\.pt)")  # a step's file, or the run.pt that completes its folder
METRICS_KEY = re.compile(r"(abandoned-[^/]+/)?metrics\.jsonl")
BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
SECRET_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
GONE = ("NoSuchKey", "404", "PreconditionFailed")  # a download whose object was deleted or replaced meanwhile
TRANSIENT_CODES = ("SlowDown", "RequestTimeout", "Throttling", "ThrottlingException", "InternalError",
                   "ServiceUnavailable", "RequestTimeTooSkewed")


def is_remote(out_dir):
    return isinstance(out_dir, str) and checkpoint.is_url(out_dir)


def parse(url):
    """(bucket, prefix) of s3://bucket/prefix; ConfigError, one line, for anything else."""
    scheme, _, rest = url.partition("://")
    bucket, _, prefix = rest.partition("/")
    prefix = prefix.strip("/")
    parts = prefix.split("/") if prefix else []
    odd = [p for p in parts if p in ("", ".", "..") or p.startswith("abandoned-") or "?" in p or "#" in p
           or checkpoint.CKPT_NAME.fullmatch(p.removesuffix(checkpoint.TMP_SUFFIX))]
    problem = ("only s3:// object-store URLs are supported" if scheme != "s3" else
               "credentials do not belong in the URL: the environment or AWS config files give them" if "@" in bucket
               else f"{bucket!r} is no bucket name (3 to 63 lowercase letters, digits, dots and hyphens)"
               if not BUCKET.fullmatch(bucket) else
               f"the prefix may not have a part {odd[0]!r}" if odd else None)
    if problem:
        raise ConfigError(scrub(f"out_dir {url}: {problem}"))
    return bucket, prefix


def cache_dir(url, kind):
    bucket, prefix = parse(url)
    root = os.environ.get("GPT_RESUME_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gpt-resume")
    return os.path.join(root, *kind, bucket, *(prefix.split("/") if prefix else []))


def staging_dir(url):
    """The local folder a run on url writes its checkpoints into: $GPT_RESUME_CACHE/<bucket>/<prefix>."""
    return cache_dir(url, ())


def read_dir(url):
    """Where readers download url's checkpoints: apart from any live run's staging folder (no bucket starts '.')."""
    return cache_dir(url, (".read",))


def scrub(text, secrets=()):
    """text on one line, without the credentials in the environment (or given), a URL's userinfo, or a signature."""
    for secret in [*secrets, *(os.environ.get(name) for name in SECRET_VARS)]:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    text = re.sub(r"(://)[^/\s@\"']*@", r"\1***@", text)
    text = re.sub(r"(X-Amz-(?:Signature|Credential|Security-Token)=)[^&\s\"']+", r"\1***", text, flags=re.I)
    return " ".join(text.split())


def code(e):
    return e.response.get("Error", {}).get("Code") if hasattr(e, "response") else None


class Store:
    """One prefix of a bucket through boto3, every call retried while the store's errors are transient."""

    def __init__(self, url, give_up_s=GIVE_UP_S, log=print):
        self.url, self.log = url.rstrip("/"), log
        self.give_up_s = give_up_s
        self.bucket, self.prefix = parse(url)
        try:
            import boto3
            from boto3.s3.transfer import TransferConfig
            from botocore.config import Config
            from botocore.exceptions import BotoCoreError, ClientError, ConnectionError, HTTPClientError
            from s3transfer.exceptions import RetriesExceededError
        except ImportError:
            raise ConfigError(f"out_dir {self.url} needs boto3: pip install boto3") from None
        self.boto_errors, self.client_error = (BotoCoreError, ClientError, RetriesExceededError), ClientError
        self.network_errors = (ConnectionError, HTTPClientError, RetriesExceededError)
        session = boto3.session.Session()  # credentials: env, AWS config files, instance role; AWS_ENDPOINT_URL
        config = Config(retries={"mode": "standard", "total_max_attempts": 2}, connect_timeout=5, read_timeout=60)
        with self.errors("cannot use"):
            self.client = session.client("s3", config=config)
            self.credentials = session.get_credentials()
        self.transfer = TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=16 << 20, max_concurrency=4)
        self.stopping, self.said = threading.Event(), threading.Lock()  # stopping: no more retries
        self.warned, self.recovered = None, 0.0  # when the outage now going on was said, and when the last ended

    def line(self, e):
        frozen = self.credentials and self.credentials.get_frozen_credentials()
        return scrub(str(e) or type(e).__name__, [frozen.secret_key, frozen.token] if frozen else [])

    @contextlib.contextmanager
    def errors(self, doing):
        """boto's errors (and a local file's) as one CheckpointError line with no secret in it."""
        try:
            yield
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            raise checkpoint.CheckpointError(f"{doing} {self.url}: {where}{e.strerror or e}") from None
        except self.boto_errors as e:
            raise checkpoint.CheckpointError(f"{doing} {self.url}: {self.line(e)}") from None

    def transient(self, e):
        if isinstance(e, self.client_error):
            return e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) >= 500 or code(e) in TRANSIENT_CODES
        return isinstance(e, self.network_errors)

    def call(self, fn, *args, **kwargs):
        """fn(...), retried with exponential backoff while the store's errors are transient, for up to give_up_s
        (said once an outage); then a CheckpointError. Other errors are raised as boto raised them."""
        began, delay = time.monotonic(), 0.25
        while True:
            attempt = time.monotonic()
            try:
                result = fn(*args, **kwargs)
            except Exception as e:
                waited = time.monotonic() - began
                if not self.transient(e) or self.stopping.is_set() or waited > self.give_up_s:
                    if self.transient(e):
                        raise checkpoint.CheckpointError(f"the object store of {self.url} stayed unreachable for "
                                                         f"{waited:.0f} s ({self.line(e)})") from None
                    raise
                with self.said:
                    if self.warned is None and attempt >= self.recovered:
                        self.warned = time.monotonic()
                        self.log(f"warning: {self.url}: {self.line(e)}; retrying for up to {self.give_up_s:.0f} s")
                if self.stopping.wait(delay):  # closing: no more tries
                    raise
                delay = min(2 * delay, 30.0)
                continue
            with self.said:
                if self.warned is not None and attempt > self.warned:
                    self.log(f"{self.url}: the object store answers again")
                    self.warned, self.recovered = None, time.monotonic()
            return result

    def key(self, name):
        return f"{self.prefix}/{name}" if self.prefix else name

    def listing(self, under=""):
        """{name below the prefix: (ETag, size)} of every object under `under`."""
        pages = self.call(lambda: list(self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.key(under))))
        base = len(self.key(""))
        return {o["Key"][base:]: (o["ETag"], o["Size"]) for page in pages for o in page.get("Contents", [])}

    def put_file(self, name, path):
        with open(path, "rb") as f:  # opened once: a local prune meanwhile leaves its bytes readable
            def upload():
                with os.fdopen(os.dup(f.fileno()), "rb") as attempt:  # s3transfer closes what it is given
                    attempt.seek(0)
                    self.client.upload_fileobj(attempt, self.bucket, self.key(name), Config=self.transfer)
            self.call(upload)

    def put_bytes(self, name, data, **conditions):
        return self.call(self.client.put_object, Bucket=self.bucket, Key=self.key(name), Body=data,
                         **conditions)["ETag"]

    def get(self, name, path):
        """Download name to path, fsynced; Vanished when the object is deleted or replaced meanwhile."""
        os.makedirs(os.path.dirname(path), exist_ok=True)

        def download():
            with open(path, "wb") as f:
                self.client.download_fileobj(self.bucket, self.key(name), f, Config=self.transfer)
                os.fsync(f.fileno())
        try:
            self.call(download)
        except self.client_error as e:
            if code(e) in GONE:
                raise checkpoint.Vanished(f"{self.url}/{name} is gone: deleted while being read") from None
            raise

    def copy(self, source, target):  # server-side; a managed copy, for objects past 5 GB
        self.call(self.client.copy, {"Bucket": self.bucket, "Key": self.key(source)}, self.bucket, self.key(target),
                  Config=self.transfer)

    def delete(self, names):
        for i in range(0, len(names), 1000):
            self.call(self.client.delete_objects, Bucket=self.bucket, Delete={
                "Objects": [{"Key": self.key(n)} for n in names[i:i + 1000]], "Quiet": True})

    def abort_uploads(self):
        """Abort the multipart uploads a killed run left under the prefix: invisible, but they cost storage."""
        found = self.call(self.client.list_multipart_uploads, Bucket=self.bucket, Prefix=self.key(""))
        for upload in found.get("Uploads", []):
            self.call(self.client.abort_multipart_upload, Bucket=self.bucket, Key=upload["Key"],
                      UploadId=upload["UploadId"])


def steps_in(listing):
    """{step: 'file' or 'folder'} of the whole checkpoints among a listing's names (a folder needs its run.pt)."""
    found = {}
    for name in listing:
        m = STEP_KEY.fullmatch(name)
        if m and name.startswith(f"ckpt_{int(m.group(1)):07d}"):  # canonical names only, as list_steps
            found[int(m.group(1))] = "folder" if m.group(2) == "/run.pt" else found.get(int(m.group(1)), "file")
    return found


def objects(listing, step, kind):
    """The names of step's objects, run.pt last: a folder counts once its run.pt is there."""
    name = os.path.basename(checkpoint.path_for("", step, kind == "folder"))
    if kind == "file":
        return [name]
    return sorted((n for n in listing if n.startswith(name + "/")), key=lambda n: n.endswith("/" + checkpoint.RUN_NAME))


def remove(path):
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def read_json(path, default):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def write_json(path, value):
    tmp = f"{path}.{uuid.uuid4().hex}.part"  # a name of this writer's own: two readers may share a read cache
    with open(tmp, "w") as f:
        json.dump(value, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sync(store, folder, steps):
    """The read cache `folder` made to hold the bucket's metrics files and the checkpoints of `steps` (None: all),
    each downloaded unless its ETag is the one already there (a folder's: its run.pt's, which changes with any of its
    files), to a name of its own, then put in place; cached steps the bucket no longer has are removed."""
    listing = store.listing()
    remote = steps_in(listing)
    os.makedirs(folder, exist_ok=True)
    tags = read_json(os.path.join(folder, "etags.json"), {})
    wanted = {os.path.basename(checkpoint.path_for("", s, kind == "folder")): objects(listing, s, kind)
              for s, kind in remote.items() if steps is None or s in steps}
    wanted |= {n: [n] for n in listing if METRICS_KEY.fullmatch(n)}
    for name, parts in wanted.items():
        final = os.path.join(folder, name)
        if tags.get(name) == listing[parts[-1]][0] and os.path.exists(final):
            continue
        tmp = f"{final}.{uuid.uuid4().hex}.part"
        try:
            for part in parts:
                store.get(part, tmp if part == name else os.path.join(tmp, part.partition("/")[2]))
            if os.path.isdir(final):  # another copy of this step: moved away first (os.replace takes no folder)
                os.rename(final, tmp + ".old")
            os.replace(tmp, final)
        finally:
            remove(tmp)
            remove(tmp + ".old")
        tags[name] = listing[parts[-1]][0]
        write_json(os.path.join(folder, "etags.json"), tags)
    for s in checkpoint.list_steps(folder):
        if s not in remote:
            remove(checkpoint.path_for(folder, s))
    return folder


def local_copy(url, steps=None, log=print, give_up_s=READ_GIVE_UP_S):
    """A local folder that reads as url's out_dir (for checkpoint.py's listing, plot.py): its metrics files and the
    checkpoints of `steps` (None: every step in the bucket), in the read cache (read_dir). Nothing is
    checked here: every load checks the CRC32s."""
    store = Store(url, give_up_s, log)
    for _ in range(100):  # a live run deletes a step a checkpoint; a hundred in a row would be no run of ours
        try:
            with store.errors("cannot read"):
                return sync(store, read_dir(url), steps)
        except checkpoint.Vanished:
            continue
    raise checkpoint.CheckpointError(f"the checkpoints in {store.url} vanish as fast as they are read")


def find_to_read(url, requested, reader, warn=lambda m: print(m, file=sys.stderr), give_up_s=READ_GIVE_UP_S):
    """checkpoint.find_to_read for a URL: (step, state) of -1, the newest step in the bucket that verifies (a
    damaged one is warned about, an older one tried), or exactly step N. A step deleted while it is downloaded (a
    live run's retention or rewind) is not damage: the bucket is listed again."""
    if requested < -1 or requested == 0:
        raise checkpoint.CheckpointError(f"from_checkpoint_step must be -1 (newest) or a step, got {requested}")
    store = Store(url, give_up_s, warn)
    folder = read_dir(url)
    for _ in range(100):
        with store.errors("cannot read"):
            remote = steps_in(store.listing())
        if requested > 0 and requested not in remote:
            raise checkpoint.CheckpointError(f"no checkpoint for step {requested} in {store.url} "
                                             f"(steps available: {', '.join(map(str, sorted(remote))) or 'none'})")
        if not remote:
            raise checkpoint.CheckpointError(f"no checkpoint to {reader} in {store.url}")
        problems = []
        try:
            for step in [requested] if requested > 0 else sorted(remote, reverse=True):
                with store.errors("cannot read"):  # an error of the store's is no damage: it stops the search
                    sync(store, folder, [step])
                try:
                    return step, checkpoint.load(checkpoint.path_for(folder, step))
                except (checkpoint.Vanished, checkpoint.ReadError):
                    raise
                except checkpoint.CheckpointError as e:
                    problem = str(e).replace(folder, store.url)
                    if requested > 0:
                        raise checkpoint.CheckpointError(problem) from None
                    warn(f"warning: {problem}; trying an older one")
                    problems.append(f"step {step}: {problem.split(': ', 1)[-1]}")
        except checkpoint.Vanished:
            continue
        raise checkpoint.CheckpointError(f"no usable checkpoint in {store.url} ({'; '.join(problems)})")
    raise checkpoint.CheckpointError(f"the checkpoints in {store.url} vanish as fast as they are read")
