"""
An object store's prefix, s3://bucket/prefix, as a run's out_dir, through boto3 (an optional extra: a URL without it
is one line naming the package): the URL and the local folders that belong to it (staging_dir, a live run's;
read_dir, readers'); a Store whose every call is retried with exponential backoff while the store's errors are
transient (said once an outage), giving up after give_up_s; every error one line with no secret in it (scrub: the
credentials in use, a URL's userinfo, a signature), as a CheckpointError. A step counts in the bucket once it is
whole there: its file, or its folder's run.pt, uploaded last (steps_in). Readers (find_to_read, local_copy) download
into a read cache of their own, never a run's staging folder; a step deleted while they read is not damage. The
lock and a live run's mirror are remote.py's.
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
GONE_CODES = ("NoSuchKey", "404", "PreconditionFailed")  # a download whose object was deleted or replaced meanwhile
TRANSIENT_CODES = ("SlowDown", "RequestTimeout", "Throttling", "ThrottlingException", "InternalError",
                   "ServiceUnavailable", "RequestTimeTooSkewed")
VANISH_RETRIES = 100  # a live run deletes a step a checkpoint: a hundred gone in a row while read is no run of ours


def is_remote(out_dir):
    return isinstance(out_dir, str) and checkpoint.is_url(out_dir)


def odd_part(part):
    """Whether a part of a prefix would make its local folder something else: a path out of the cache (empty, '.',
    '..'), a query or fragment (a signed URL's), a rewind's folder or a checkpoint of the prefix above it."""
    if part in ("", ".", "..") or "?" in part or "#" in part or part.startswith("abandoned-"):
        return True
    return checkpoint.CKPT_NAME.fullmatch(part.removesuffix(checkpoint.TMP_SUFFIX)) is not None


def parse(url):
    """(bucket, prefix) of s3://bucket/prefix; ConfigError, one line, for anything else."""
    scheme, _, rest = url.partition("://")
    bucket, _, prefix = rest.partition("/")
    prefix = prefix.strip("/")
    problem = None
    if scheme != "s3":
        problem = "only s3:// object-store URLs are supported"
    elif "@" in bucket:
        problem = "credentials do not belong in the URL: the environment or AWS config files give them"
    elif not BUCKET.fullmatch(bucket):
        problem = f"{bucket!r} is no bucket name (3 to 63 lowercase letters, digits, dots and hyphens)"
    else:
        parts = prefix.split("/") if prefix else []
        odd = [part for part in parts if odd_part(part)]
        if odd:
            problem = f"the prefix may not have a part {odd[0]!r}"
    if problem:
        raise ConfigError(scrub(f"out_dir {url}: {problem}"))
    return bucket, prefix


def cache_dir(url, subfolders):
    """$GPT_RESUME_CACHE (else ~/.cache/gpt-resume), then subfolders, then url's bucket and its prefix's parts."""
    bucket, prefix = parse(url)
    root = os.environ.get("GPT_RESUME_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gpt-resume")
    return os.path.join(root, *subfolders, bucket, *(prefix.split("/") if prefix else []))


def staging_dir(url):
    """The local folder a run on url writes its checkpoints into: $GPT_RESUME_CACHE/<bucket>/<prefix>."""
    return cache_dir(url, ())


def read_dir(url):
    """Where readers download url's checkpoints: apart from any live run's staging folder (no bucket starts '.')."""
    return cache_dir(url, (".read",))


def scrub(text, secrets=()):
    """text on one line, without the credentials in the environment (or given), a URL's userinfo, or a signature."""
    for secret in [*secrets, *(os.environ.get(name) for name in SECRET_VARS)]:
        if secret and len(secret) >= 4:  # a shorter one would star out ordinary words
            text = text.replace(secret, "***")
    text = re.sub(r"(://)[^/\s@\"']*@", r"\1***@", text)
    text = re.sub(r"(X-Amz-(?:Signature|Credential|Security-Token)=)[^&\s\"']+", r"\1***", text, flags=re.I)
    return " ".join(text.split())


def error_code(e):
    """The S3 error code of a boto ClientError ('NoSuchKey', 'SlowDown'...); None for any other exception."""
    return e.response.get("Error", {}).get("Code") if hasattr(e, "response") else None


def step_name(step, kind):
    """The name of step's checkpoint, kind 'file' or 'folder', in a bucket's prefix as in a folder."""
    return os.path.basename(checkpoint.path_for("", step, kind == "folder"))


class Store:
    """One prefix of a bucket through boto3, every call retried while the store's errors are transient."""

    def __init__(self, url, give_up_s=GIVE_UP_S, log=print):
        self.url = url.rstrip("/")
        self.log = log
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
        self.client_error = ClientError
        self.boto_errors = (BotoCoreError, ClientError, RetriesExceededError)  # what errors() makes one line of
        # what a lost connection raises; RetriesExceededError is s3transfer's, once its own retries of one are spent
        self.network_errors = (ConnectionError, HTTPClientError, RetriesExceededError)
        session = boto3.session.Session()  # credentials: env, AWS config files, instance role; AWS_ENDPOINT_URL
        # boto's own retries kept short: call() retries, with one budget and one line an outage
        config = Config(retries={"mode": "standard", "total_max_attempts": 2}, connect_timeout=5, read_timeout=60)
        with self.errors("cannot use"):
            self.client = session.client("s3", config=config)
            self.credentials = session.get_credentials()
        self.transfer = TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=16 << 20, max_concurrency=4)
        self.stopping = threading.Event()  # set on closing: no more retries, no more waits between them
        self.outage_lock = threading.Lock()  # the mirror's thread and the lock's renewals both call
        self.outage_said_at = None  # time.monotonic() when the outage now going on was said; None: there is none
        self.outage_ended_at = 0.0  # when the last one ended

    def error_line(self, e):
        """e as one line, scrubbed of the credentials in use, wherever they came from (a file, a role)."""
        frozen = self.credentials and self.credentials.get_frozen_credentials()
        secrets = [frozen.secret_key, frozen.token] if frozen else []
        return scrub(str(e) or type(e).__name__, secrets)

    @contextlib.contextmanager
    def errors(self, doing):
        """boto's errors (and a local file's) as one CheckpointError line with no secret in it."""
        try:
            yield
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            raise checkpoint.CheckpointError(f"{doing} {self.url}: {where}{e.strerror or e}") from None
        except self.boto_errors as e:
            raise checkpoint.CheckpointError(f"{doing} {self.url}: {self.error_line(e)}") from None

    def transient(self, e):
        """Whether e may pass if tried again: the store's 5xx, throttling, a skewed clock, a lost connection."""
        if isinstance(e, self.client_error):
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            return status >= 500 or error_code(e) in TRANSIENT_CODES
        return isinstance(e, self.network_errors)

    def call(self, fn, *args, **kwargs):
        """fn(...), retried with exponential backoff while the store's errors are transient, for up to give_up_s
        (said once an outage); then a CheckpointError. Other errors are raised as boto raised them."""
        began = time.monotonic()
        delay = 0.25
        while True:
            attempt_began = time.monotonic()
            try:
                result = fn(*args, **kwargs)
            except Exception as e:
                if not self.transient(e):
                    raise
                waited = time.monotonic() - began
                if self.stopping.is_set() or waited > self.give_up_s:
                    raise checkpoint.CheckpointError(f"the object store of {self.url} stayed unreachable for "
                                                     f"{waited:.0f} s ({self.error_line(e)})") from None
                with self.outage_lock:
                    # said once: an attempt begun before the last outage ended fails of that one, said already
                    if self.outage_said_at is None and attempt_began >= self.outage_ended_at:
                        self.outage_said_at = time.monotonic()
                        self.log(f"warning: {self.url}: {self.error_line(e)}; retrying for up to "
                                 f"{self.give_up_s:.0f} s")
                if self.stopping.wait(delay):  # closing: no more tries
                    raise
                delay = min(2 * delay, 30.0)
                continue
            with self.outage_lock:
                # only an attempt begun after the outage was said shows the store is back: an older one may have
                # been answered before the outage began
                if self.outage_said_at is not None and attempt_began > self.outage_said_at:
                    self.log(f"{self.url}: the object store answers again")
                    self.outage_said_at = None
                    self.outage_ended_at = time.monotonic()
            return result

    def key(self, name):
        return f"{self.prefix}/{name}" if self.prefix else name

    def listing(self, under=""):
        """{name below the prefix: (ETag, size)} of every object under `under`."""
        paginator = self.client.get_paginator("list_objects_v2")
        # list(): the pages are fetched as they are iterated, so inside the retried call
        pages = self.call(lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=self.key(under))))
        prefix_length = len(self.key(""))
        return {o["Key"][prefix_length:]: (o["ETag"], o["Size"]) for page in pages for o in page.get("Contents", [])}

    def put_file(self, name, path):
        with open(path, "rb") as f:  # opened once: a local prune meanwhile leaves its bytes readable
            def upload():
                with os.fdopen(os.dup(f.fileno()), "rb") as attempt:  # s3transfer closes what it is given
                    attempt.seek(0)  # a retry starts over
                    self.client.upload_fileobj(attempt, self.bucket, self.key(name), Config=self.transfer)
            self.call(upload)

    def put_bytes(self, name, data, **conditions):
        """Write data as name (conditions: IfMatch, IfNoneMatch, as S3 takes them); returns the new ETag."""
        reply = self.call(self.client.put_object, Bucket=self.bucket, Key=self.key(name), Body=data, **conditions)
        return reply["ETag"]

    def get(self, name, path):
        """Download name to path, fsynced; Vanished when the object is deleted or replaced meanwhile."""
        os.makedirs(os.path.dirname(path), exist_ok=True)

        def download():
            with open(path, "wb") as f:  # opened anew each try: a retry starts over
                self.client.download_fileobj(self.bucket, self.key(name), f, Config=self.transfer)
                os.fsync(f.fileno())
        try:
            self.call(download)
        except self.client_error as e:
            if error_code(e) in GONE_CODES:
                raise checkpoint.Vanished(f"{self.url}/{name} is gone: deleted while being read") from None
            raise

    def copy(self, source, target):
        """Copy within the bucket, server-side; a managed copy, for objects past 5 GB."""
        self.call(self.client.copy, {"Bucket": self.bucket, "Key": self.key(source)}, self.bucket, self.key(target),
                  Config=self.transfer)

    def delete(self, names):
        for first in range(0, len(names), 1000):  # S3 takes at most 1000 keys a request
            batch = [{"Key": self.key(name)} for name in names[first:first + 1000]]
            self.call(self.client.delete_objects, Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

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
        match = STEP_KEY.fullmatch(name)
        if match is None:
            continue
        step = int(match.group(1))
        if not name.startswith(f"ckpt_{step:07d}"):  # canonical names only, as list_steps
            continue
        if match.group(2) == "/run.pt":
            found[step] = "folder"  # a folder wins over a file of the same step, as path_for's choice on disk
        else:
            found.setdefault(step, "file")
    return found


def objects(listing, step, kind):
    """The names of step's objects, run.pt last: a folder counts once its run.pt is there."""
    name = step_name(step, kind)
    if kind == "file":
        return [name]
    in_folder = [n for n in listing if n.startswith(name + "/")]
    return sorted(in_folder, key=lambda n: n.endswith("/" + checkpoint.RUN_NAME))  # False sorts first


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
    in_bucket = steps_in(listing)
    os.makedirs(folder, exist_ok=True)
    etags_path = os.path.join(folder, "etags.json")
    etags = read_json(etags_path, {})
    wanted = {}  # {name in the folder: its objects, the last the one whose ETag stands for it}
    for step, kind in in_bucket.items():
        if steps is None or step in steps:
            wanted[step_name(step, kind)] = objects(listing, step, kind)
    for name in listing:
        if METRICS_KEY.fullmatch(name):
            wanted[name] = [name]
    for name, parts in wanted.items():
        final = os.path.join(folder, name)
        etag = listing[parts[-1]][0]
        if etags.get(name) == etag and os.path.exists(final):
            continue
        tmp = f"{final}.{uuid.uuid4().hex}.part"  # a name of this reader's own: two readers may share a read cache
        try:
            for part in parts:
                if part == name:  # a file
                    store.get(part, tmp)
                else:  # a folder's file, ckpt_<step>/<file>
                    store.get(part, os.path.join(tmp, part.partition("/")[2]))
            if os.path.isdir(final):  # another copy of this step: moved away first (os.replace takes no folder)
                os.rename(final, tmp + ".old")
            os.replace(tmp, final)
        finally:
            remove(tmp)
            remove(tmp + ".old")
        etags[name] = etag
        write_json(etags_path, etags)
    for step in checkpoint.list_steps(folder):
        if step not in in_bucket:
            remove(checkpoint.path_for(folder, step))
    return folder


def local_copy(url, steps=None, log=print, give_up_s=READ_GIVE_UP_S):
    """A local folder that reads as url's out_dir (for checkpoint.py's listing, plot.py): its metrics files and the
    checkpoints of `steps` (None: every step in the bucket), in the read cache (read_dir). Nothing is
    checked here: every load checks the CRC32s."""
    store = Store(url, give_up_s, log)
    for _ in range(VANISH_RETRIES):
        try:
            with store.errors("cannot read"):
                return sync(store, read_dir(url), steps)
        except checkpoint.Vanished:  # deleted by a live run's retention as we read: list the bucket again
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
    for _ in range(VANISH_RETRIES):
        with store.errors("cannot read"):
            in_bucket = steps_in(store.listing())
        if requested > 0 and requested not in in_bucket:
            available = ", ".join(map(str, sorted(in_bucket))) or "none"
            raise checkpoint.CheckpointError(f"no checkpoint for step {requested} in {store.url} "
                                             f"(steps available: {available})")
        if not in_bucket:
            raise checkpoint.CheckpointError(f"no checkpoint to {reader} in {store.url}")
        candidates = [requested] if requested > 0 else sorted(in_bucket, reverse=True)
        problems = []
        try:
            for step in candidates:
                with store.errors("cannot read"):  # an error of the store's is no damage: it stops the search
                    sync(store, folder, [step])
                try:
                    return step, checkpoint.load(checkpoint.path_for(folder, step))
                except (checkpoint.Vanished, checkpoint.ReadError):  # no damage either: not warned about as such
                    raise
                except checkpoint.CheckpointError as e:
                    problem = str(e).replace(folder, store.url)  # the bucket is what the user knows
                    if requested > 0:
                        raise checkpoint.CheckpointError(problem) from None
                    warn(f"warning: {problem}; trying an older one")
                    problems.append(f"step {step}: {problem.split(': ', 1)[-1]}")
        except checkpoint.Vanished:  # deleted by a live run as we read: list the bucket again
            continue
        raise checkpoint.CheckpointError(f"no usable checkpoint in {store.url} ({'; '.join(problems)})")
    raise checkpoint.CheckpointError(f"the checkpoints in {store.url} vanish as fast as they are read")
