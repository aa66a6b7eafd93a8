"""
out_dir in object storage (objstore.py, remote.py), against a real S3 API server: moto_server (pip install
"moto[server]"), started here on 127.0.0.1 as a process of its own, with fake credentials whose secret key must
never show. Every test has a bucket of its own. Between the store and the runs that must lose it, a TCP proxy (a
process too, optionally slowed down) is killed and started again: the store stays, the connection goes.
    python3 -m pytest -q -p no:randomly test_object_store.py
- a run goes up and a fresh disk resumes its newest step bit-exactly; a sharded folder goes up run.pt last;
- a half-uploaded step (an incomplete multipart upload, a folder without run.pt) is absent, and cleaned;
- a damaged or truncated object is refused with a warning naming it, an older step resumed, the damaged set aside;
- a rewind copies the newer steps into abandoned-<time>/ before it deletes any; a failed copy deletes nothing;
- one run per prefix: a live holder is refused naming it, a dead one holds nothing, a lock renewed elsewhere is
  refused, a lock not renewed is taken over, a holder whose lock was taken over stops;
- the store lost mid-upload and back: retried, said once; lost past the budget: one line, the lock left to lapse,
  the rerun on this machine uploads the rest; kill -9 mid-upload loses only the steps since the last whole one;
- a staging folder another run has moved past is set aside; a reader never fails while the writer prunes;
- no credential in any line, object or file; without boto3, a URL is one line naming the package.
"""
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import uuid
import zipfile

import pytest
import torch

import checkpoint
import housekeeping
import objstore
import remote
import sharded
from configurator import ConfigError
from conftest import HERE, TINY, assert_identical, run, run_ranks, state_at
from logs import metrics_path

boto3 = pytest.importorskip("boto3")
MOTO = shutil.which("moto_server")
pytestmark = [pytest.mark.skipif(MOTO is None, reason='needs moto_server: pip install "moto[server]"'),
              pytest.mark.xdist_group("object_store")]  # one worker, one server
SECRET = "SECRETSECRET123"  # fake, and recognisable wherever it would leak
TOKEN = "TOKENTOKEN456"
PROXY = r"""
import socket, sys, threading, time
listen = int(sys.argv[1])
target = int(sys.argv[2])
rate = float(sys.argv[3])  # bytes/s each way, 0: no limit
server = socket.create_server(("127.0.0.1", listen))
def pipe(a, b):
    try:
        while data := a.recv(1 << 16):
            b.sendall(data)
            time.sleep(len(data) / rate if rate else 0)
    except OSError:
        pass
    for s in (a, b):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
def serve(c):
    u = socket.create_connection(("127.0.0.1", target))
    threading.Thread(target=pipe, args=(u, c), daemon=True).start()
    pipe(c, u)
print("ready", flush=True)
while True:
    threading.Thread(target=serve, args=(server.accept()[0],), daemon=True).start()
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port, proc, seconds=30):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


@pytest.fixture(scope="session")
def moto():
    port = free_port()
    proc = subprocess.Popen([MOTO, "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, proc)
    yield port
    proc.kill()
    proc.wait()


class Proxy:
    """A TCP proxy to the server, a process of its own: stop() is the store going away, start() it coming back."""

    def __init__(self, target, rate=0):
        self.port = free_port()
        self.target = target
        self.rate = rate
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([sys.executable, "-c", PROXY, str(self.port), str(self.target), str(self.rate)],
                                     stdout=subprocess.PIPE)
        self.proc.stdout.readline()

    def stop(self):
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def s3(moto, tmp_path, monkeypatch):
    """A bucket of this test's own, and the environment a run sees: the endpoint, fake credentials, no AWS config
    file, a cache folder of this test's own."""
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{moto}", "AWS_ACCESS_KEY_ID": "AKIAFAKEFAKEFAKE",
           "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_SESSION_TOKEN": TOKEN, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
           "AWS_EC2_METADATA_DISABLED": "true", "GPT_RESUME_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": HERE}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    client.create_bucket(Bucket=bucket)

    class S3:
        url = f"s3://{bucket}/runs/a"
        port = moto

        def keys(self, under=""):
            pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="runs/a/" + under)
            return sorted(o["Key"][len("runs/a/"):] for page in pages for o in page.get("Contents", []))

        def read(self, name):
            return client.get_object(Bucket=bucket, Key="runs/a/" + name)["Body"].read()

        def write(self, name, data):
            client.put_object(Bucket=bucket, Key="runs/a/" + name, Body=data)

    S3.client = client
    S3.bucket = bucket
    return S3()


def state(step, n=16):
    """A checkpoint's dict as every reader expects one, its tensor a function of the step."""
    return {"model": {"w": torch.arange(n, dtype=torch.float32) + step}, "step": step, "meta": {"vocab_size": 10},
            "model_args": {k: 1 for k in checkpoint.SHAPE_KEYS}, "config": {"seed": 1},
            "optimizer": {"state": {0: {"exp_avg": torch.full((n,), float(step))}}, "param_groups": [{"lr": 0.1}]}}


def equal(a, b):
    return torch.equal(a["model"]["w"], b["model"]["w"]) and torch.equal(a["optimizer"]["state"][0]["exp_avg"],
                                                                          b["optimizer"]["state"][0]["exp_avg"])


def save_folder(out_dir, step, n=16):
    """A sharded run's checkpoint folder, as saver.publish_folder completes one (DCP on one process)."""
    import torch.distributed.checkpoint as dcp
    tmp = checkpoint.path_for(out_dir, step, folder=True) + checkpoint.TMP_SUFFIX
    dcp.save(sharded.tensors_of(state(step, n)), checkpoint_id=tmp, no_dist=True)
    checkpoint.save(None, step, sharded.run_info(state(step, n)) | {"checksums": sharded.checksums(tmp)},
                    path=os.path.join(tmp, checkpoint.RUN_NAME))
    os.rename(tmp, tmp[:-len(checkpoint.TMP_SUFFIX)])
    return tmp[:-len(checkpoint.TMP_SUFFIX)]


def until(done, seconds=20):
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, "waited in vain"
        time.sleep(0.05)


def record(out_dir, step, **fields):
    with open(metrics_path(out_dir), "a") as f:
        f.write(json.dumps({"step": step, **fields}) + "\n")


def train(mirror, steps, n=16, protect=()):
    """What a run's loop does for the mirror: a metrics line and a published checkpoint a step."""
    for step in steps:
        record(mirror.staging, step, loss=1.0 / step)
        mirror.metrics_changed()
        path = checkpoint.save(mirror.staging, step, state(step, n))
        checkpoint.prune(mirror.staging, mirror.keep_last, mirror.keep_every, protect)
        mirror.published(path, protect)
        mirror.check()


def start(url, keep_last=0, requested=-1, log=None, **kwargs):
    """A run's start on url: the lock, the step to resume, the staging folder made the run's (as outdir does)."""
    mirror = remote.Mirror(url, keep_last, 0, log=log if log is not None else print, **kwargs)
    staging, step = mirror.prepare(requested, warn=mirror.log)
    checkpoint.remove_temporaries(staging)
    mirror.opened(step, housekeeping.rewind(staging, step), protect=[step])
    return mirror, step


def lock_record(s3):
    return json.loads(s3.read(remote.LOCK_NAME))


def test_urls_are_parsed_or_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT_RESUME_CACHE", str(tmp_path))
    assert objstore.is_remote("s3://bkt/x") and not objstore.is_remote("out") and not objstore.is_remote("/a/b")
    assert objstore.parse("s3://my.bucket-1/runs/a/") == ("my.bucket-1", "runs/a")
    assert objstore.parse("s3://my-bucket") == ("my-bucket", "")
    for bad in ("gs://bkt/x", "s3://Bkt/x", "s3://b/x", f"s3://AKIA:{SECRET}@bkt/x", "s3://bkt/run/../x",
                "s3://bkt/run//x", "s3://bkt/run/ckpt_0000010", "s3://bkt/abandoned-1/x",
                f"s3://bkt/run?X-Amz-Signature={SECRET}"):
        with pytest.raises(ConfigError) as e:
            objstore.parse(bad)
        assert "\n" not in str(e.value) and SECRET not in str(e.value) and "out_dir" in str(e.value), bad
    staging = objstore.staging_dir("s3://bkt/runs/a")
    reads = objstore.read_dir("s3://bkt/runs/a")
    assert staging == str(tmp_path / "bkt" / "runs" / "a") and reads.startswith(str(tmp_path)) and reads != staging


def test_without_boto3_a_url_is_one_line_naming_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "boto3", None)
    with pytest.raises(ConfigError, match="pip install boto3"):
        objstore.Store("s3://bkt/x")


def test_the_bucket_keeps_what_retention_keeps_on_disk(tmp_path):
    """checkpoint.doomed, the rule the bucket's retention (remote.py) shares with checkpoint.prune, is what prune
    deletes on a folder of the same steps."""
    rng = random.Random(0)
    for case in range(200):
        steps = sorted(rng.sample(range(1, 60), rng.randint(0, 8)))
        keep_last = rng.randint(0, 4)
        keep_every = rng.choice([0, 5, 20])
        protect = rng.sample(range(1, 60), 2)
        folder = tmp_path / str(case)
        folder.mkdir()
        for step in steps:
            open(checkpoint.path_for(str(folder), step, folder=False), "wb").close()
        doomed = checkpoint.doomed(steps, keep_last, keep_every, protect)
        assert checkpoint.prune(str(folder), keep_last, keep_every, protect) == doomed
        assert checkpoint.list_steps(str(folder)) == [s for s in steps if s not in doomed]


def test_a_run_goes_up_and_a_fresh_disk_resumes_its_newest_step_exactly(s3, tmp_path, monkeypatch):
    lines = []
    mirror, step = start(s3.url, keep_last=2, log=lines.append)
    assert step == 0 and lock_record(s3)["state"] == "held"
    train(mirror, [10, 20, 30], n=1000)
    mirror.close()
    assert s3.keys() == ["ckpt_0000020.pt", "ckpt_0000030.pt", "metrics.jsonl", "train.lock"]  # 10: retention's
    assert lock_record(s3)["state"] == "free" and lines == []
    with open(metrics_path(mirror.staging), "rb") as f:
        assert s3.read("metrics.jsonl") == f.read()
    monkeypatch.setenv("GPT_RESUME_CACHE", str(tmp_path / "fresh"))  # a machine with an empty disk
    for requested, expected in ((-1, 30), (20, 20)):
        again = remote.Mirror(s3.url, 2, 0)
        staging, step = again.prepare(requested)
        assert step == expected and staging != mirror.staging
        assert equal(checkpoint.load(checkpoint.path_for(staging, step)), state(step, 1000))
        assert open(metrics_path(staging), "rb").read() == s3.read("metrics.jsonl")
        assert not [n for n in os.listdir(staging) if n.endswith(checkpoint.TMP_SUFFIX)]
        again.close()
    with remote.Mirror(s3.url, 2, 0) as again, pytest.raises(checkpoint.CheckpointError, match="step 25 .*20, 30"):
        again.prepare(25)


def test_a_folder_goes_up_run_pt_last_and_a_half_uploaded_step_is_absent(s3, tmp_path, monkeypatch):
    mirror, _ = start(s3.url)
    order = []
    put_file = mirror.store.put_file

    def put_file_in_order(name, path):
        order.append(name)
        put_file(name, path)
    monkeypatch.setattr(mirror.store, "put_file", put_file_in_order)
    mirror.published(save_folder(mirror.staging, 40), [0])
    mirror.close()
    assert order[-1] == "ckpt_0000040/run.pt" and len(order) == 3
    s3.write("ckpt_0000050/__0_0.distcp", b"shards of a folder whose run.pt never went up")
    upload = s3.client.create_multipart_upload(Bucket=s3.bucket, Key="runs/a/ckpt_0000060.pt")
    s3.client.upload_part(Bucket=s3.bucket, Key="runs/a/ckpt_0000060.pt", UploadId=upload["UploadId"],
                          PartNumber=1, Body=b"x" * (5 << 20))
    monkeypatch.setenv("GPT_RESUME_CACHE", str(tmp_path / "fresh"))
    again, step = start(s3.url)
    assert step == 40 and equal(checkpoint.load(checkpoint.path_for(again.staging, 40)), state(40))
    again.close()
    assert "ckpt_0000050/__0_0.distcp" not in s3.keys() and "ckpt_0000040/run.pt" in s3.keys()
    assert not s3.client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads")


def damaged_copies(path):
    """(a copy of the checkpoint file at path cut short, one with a bit flipped in its tensor data)."""
    data = bytearray(open(path, "rb").read())
    with zipfile.ZipFile(path) as z:
        record = max(z.infolist(), key=lambda r: r.file_size)
    data[record.header_offset + 200] ^= 1
    return open(path, "rb").read()[:len(data) // 2], bytes(data)


def test_a_damaged_object_is_refused_and_an_older_step_resumed(s3, tmp_path, monkeypatch):
    mirror, _ = start(s3.url)
    train(mirror, [10, 20], n=1000)
    mirror.close()
    truncated, flipped = damaged_copies(checkpoint.save(str(tmp_path), 30, state(30, 1000)))
    s3.write("ckpt_0000030.pt", truncated)
    s3.write("ckpt_0000040.pt", flipped)
    monkeypatch.setenv("GPT_RESUME_CACHE", str(tmp_path / "reader"))
    warnings = []
    step, loaded = objstore.find_to_read(s3.url, -1, "sample from", warnings.append)
    assert step == 20 and equal(loaded, state(20, 1000)) and len(warnings) == 2
    assert "ckpt_0000040.pt" in warnings[0] and "checksum mismatch" in warnings[0] and s3.url in warnings[0]
    assert "ckpt_0000030.pt" in warnings[1] and "not a whole zip file" in warnings[1]
    with pytest.raises(checkpoint.CheckpointError, match="ckpt_0000040.pt"):
        objstore.find_to_read(s3.url, 40, "sample from")
    monkeypatch.setenv("GPT_RESUME_CACHE", str(tmp_path / "fresh"))
    lines = []
    again, step = start(s3.url, log=lines.append)
    again.close()
    assert step == 20 and checkpoint.list_steps(again.staging) == [20]
    assert [line for line in lines if "warning" in line and "trying an older one" in line][0].count("40") >= 1
    live = s3.keys()
    assert "ckpt_0000030.pt" not in live and "ckpt_0000040.pt" not in live
    aside = [k for k in live if k.startswith("abandoned-")]
    assert sorted(k.split("/", 1)[1] for k in aside) == ["ckpt_0000030.pt", "ckpt_0000040.pt", "metrics.jsonl"]


def test_a_rewind_copies_the_newer_steps_aside_before_it_deletes_any(s3, tmp_path, monkeypatch):
    mirror, _ = start(s3.url)
    train(mirror, [10, 20, 30])
    mirror.close()
    failing = remote.Mirror(s3.url, 0, 0)
    staging, step = failing.prepare(10)

    def copy_fails(source, target):
        raise OSError(5, "EIO")
    monkeypatch.setattr(failing.store, "copy", copy_fails)
    failing.opened(10, housekeeping.rewind(staging, 10), [10])
    failing.close()
    with pytest.raises(checkpoint.CheckpointError, match="EIO"):
        failing.check()
    s3.write(remote.LOCK_NAME, json.dumps(lock_record(s3) | {"state": "free"}).encode())  # as if it had ended
    assert [k for k in s3.keys() if k.startswith("ckpt_")] == ["ckpt_0000010.pt", "ckpt_0000020.pt",
                                                                "ckpt_0000030.pt"]
    monkeypatch.setenv("GPT_RESUME_CACHE", str(tmp_path / "other"))  # the rewind done again, from another machine
    lines = []
    again, step = start(s3.url, requested=20, log=lines.append)
    train(again, [30])
    again.close()
    keys = s3.keys()
    aside = sorted({k.split("/")[0] for k in keys if k.startswith("abandoned-")})
    assert len(aside) == 1 and f"{aside[0]}/ckpt_0000030.pt" in keys and "ckpt_0000020.pt" in keys
    assert any("moved step 30" in line for line in lines)
    assert [json.loads(line)["step"] for line in s3.read(f"{aside[0]}/metrics.jsonl").splitlines()] == [10, 20, 30]
    assert [json.loads(line)["step"] for line in s3.read("metrics.jsonl").splitlines()] == [10, 20, 30]


def holder(url, code="pass"):
    """A process that takes url's lock (lease 2 s), after running `code`, and holds it; it says 'held' first."""
    script = (f"import objstore, remote, time; {code}; lock = remote.Lock(objstore.Store({url!r}), 2.0); "
              f"lock.acquire(); print('held', flush=True); time.sleep(60)")
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=HERE)


def as_if_ended(s3):
    """Make the lock this process left held name a process that is gone, as after the run's own process ended."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    s3.write(remote.LOCK_NAME, json.dumps(lock_record(s3) | {"pid": gone.pid}).encode())


def test_one_run_per_prefix_whoever_holds_it(s3):
    live = holder(s3.url)
    elsewhere = holder(s3.url + "/b", "remote.this_machine = lambda: 'another machine'")  # renewing, as a live run
    assert live.stdout.readline() == elsewhere.stdout.readline() == b"held\n"
    store = objstore.Store(s3.url)
    began = time.monotonic()
    with pytest.raises(checkpoint.CheckpointError) as e:
        remote.Lock(store, 2.0).acquire()
    assert socket.gethostname() in str(e.value) and f"pid {live.pid}" in str(e.value)
    assert time.monotonic() - began < 1.0  # a live process of this machine: refused at once
    live.kill()
    live.wait()
    lines = []
    lock = remote.Lock(store, 2.0)
    assert lock.acquire(lines.append)["pid"] == live.pid and time.monotonic() - began < 2.0  # dead: taken at once
    assert f"pid {live.pid}" in lines[0] and "gone" in lines[0]
    lock.release()
    assert lock_record(s3)["state"] == "free"
    other = objstore.Store(s3.url + "/b")
    with pytest.raises(checkpoint.CheckpointError, match=f"pid {elsewhere.pid}"):  # renewed while watched
        remote.Lock(other, 2.0).acquire(lines.append)
    elsewhere.kill()
    elsewhere.wait()
    began = time.monotonic()
    lines = []
    lock = remote.Lock(other, 2.0)
    lock.acquire(lines.append)  # its holder is dead, but on another machine: taken once 2 s pass unrenewed
    assert 1.0 < time.monotonic() - began < 6.0 and any(f"pid {elsewhere.pid}" in line for line in lines)
    other.put_bytes(remote.LOCK_NAME, json.dumps({"state": "held", "host": "node7", "pid": 4242}).encode())
    with pytest.raises(checkpoint.CheckpointError, match="taken over by another run.*node7"):
        lock.renew()
    with pytest.raises(checkpoint.CheckpointError, match="node7"):
        lock.ensure()


def test_the_store_lost_mid_upload_and_back_is_retried_and_said_once(s3, monkeypatch):
    proxy = Proxy(s3.port, rate=2e6)
    proxy.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    lines = []
    mirror, _ = start(s3.url, log=lines.append, give_up_s=30, lease_s=30)
    mirror.store.transfer.multipart_threshold = 5 << 20
    mirror.store.transfer.multipart_chunksize = 5 << 20
    train(mirror, [10], n=3 << 19)  # 12 MB: parts of 5 MB, each at 2 MB/s
    time.sleep(0.5)
    proxy.stop()
    time.sleep(1.0)
    proxy.start()
    mirror.close()
    proxy.stop()
    mirror.check()
    assert len([line for line in lines if "retrying" in line]) == 1, lines
    assert len([line for line in lines if "answers again" in line]) == 1, lines
    assert "ckpt_0000010.pt" in s3.keys() and lock_record(s3)["state"] == "free"
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{s3.port}")
    step, loaded = objstore.find_to_read(s3.url, -1, "sample from")
    assert step == 10 and equal(loaded, state(10, 3 << 19))


def test_the_store_lost_past_the_budget_stops_the_run_in_one_line(s3, monkeypatch):
    proxy = Proxy(s3.port)
    proxy.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    lines = []
    mirror, _ = start(s3.url, log=lines.append, give_up_s=2.5)
    train(mirror, [10])
    until(lambda: "ckpt_0000010.pt" in s3.keys())
    proxy.stop()
    train(mirror, [20])
    deadline = time.monotonic() + 20
    with pytest.raises(checkpoint.CheckpointError) as e:
        while time.monotonic() < deadline:
            mirror.check()
            time.sleep(0.05)
    began = time.monotonic()
    mirror.close()
    line = str(e.value)
    assert time.monotonic() - began < 2.0 and "\n" not in line and SECRET not in line and TOKEN not in line
    assert s3.url in line and "unreachable" in line and "step 10" in line and mirror.staging in line
    assert len([line for line in lines if "retrying" in line]) == 1, (lines, line)
    assert lock_record(s3)["state"] == "held" and "ckpt_0000020.pt" not in s3.keys()  # the lock left to lapse
    as_if_ended(s3)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{s3.port}")  # the store is back: rerun
    again, step = start(s3.url)
    again.close()
    assert step == 20 and "ckpt_0000020.pt" in s3.keys()


WRITER = """
import sys, time, test_object_store as t
mirror, _ = t.start(sys.argv[1])
t.train(mirror, [10])
while "ckpt_0000010.pt" not in mirror.store.listing():
    time.sleep(0.05)
mirror.store.transfer.multipart_threshold = 5 << 20
mirror.store.transfer.multipart_chunksize = 5 << 20
print("uploading", flush=True)
t.train(mirror, [20], n=3 << 19)
time.sleep(60)
"""


def test_kill_9_mid_upload_loses_only_the_steps_since_the_last_whole_one(s3, tmp_path, monkeypatch):
    proxy = Proxy(s3.port, rate=1e6)  # parts of 5 MB at 1 MB/s each: killed well before it is up
    proxy.start()
    writer = subprocess.Popen([sys.executable, "-c", WRITER, s3.url], stdout=subprocess.PIPE, cwd=HERE,
                              env=os.environ | {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"})
    assert writer.stdout.readline() == b"uploading\n"
    time.sleep(1.0)
    writer.kill()
    writer.wait()
    proxy.stop()
    assert s3.client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads")  # killed mid-upload
    monkeypatch.setenv("GPT_RESUME_CACHE", str(tmp_path / "reader"))  # a fresh disk sees the last whole step
    assert objstore.find_to_read(s3.url, -1, "sample from")[0] == 10
    monkeypatch.setenv("GPT_RESUME_CACHE", str(tmp_path / "cache"))  # the rerun on the writer's machine
    lines = []
    again, step = start(s3.url, log=lines.append)
    again.close()
    assert step == 20 and any("gone" in line for line in lines)  # the dead writer's lock: taken at once
    assert not s3.client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads")
    monkeypatch.setenv("GPT_RESUME_CACHE", str(tmp_path / "reader"))
    step, loaded = objstore.find_to_read(s3.url, -1, "sample from")
    assert step == 20 and equal(loaded, state(20, 3 << 19))


def test_a_staging_folder_another_run_has_moved_past_is_set_aside(s3, tmp_path, monkeypatch):
    first, _ = start(s3.url)
    train(first, [10, 20])
    first.close()
    monkeypatch.setenv("GPT_RESUME_CACHE", str(tmp_path / "elsewhere"))
    other, step = start(s3.url)
    train(other, [30])
    other.close()
    monkeypatch.setenv("GPT_RESUME_CACHE", str(tmp_path / "cache"))
    lines = []
    again, step = start(s3.url, log=lines.append)
    again.close()
    aside = [n for n in os.listdir(again.staging) if n.startswith("abandoned-")]
    assert step == 30 and checkpoint.list_steps(again.staging) == [30] and len(aside) == 1
    assert checkpoint.list_steps(os.path.join(again.staging, aside[0])) == [10, 20]
    assert any(aside[0] in line for line in lines)
    assert open(metrics_path(again.staging), "rb").read() == s3.read("metrics.jsonl")


READER = """
import sys, objstore
for _ in range(int(sys.argv[2])):
    print(objstore.find_to_read(sys.argv[1], -1, "sample from")[0], flush=True)
"""


def test_a_reader_never_fails_while_the_writer_prunes(s3, monkeypatch):
    mirror, _ = start(s3.url, keep_last=1)
    train(mirror, [10, 20])
    mirror.close()
    get = objstore.Store.get

    def pruned_first(store, name, path):  # the writer's retention deletes the step just listed
        if name == "ckpt_0000020.pt" and not pruned_first.done:
            s3.client.delete_object(Bucket=s3.bucket, Key="runs/a/" + name)
            s3.write("ckpt_0000030.pt", checkpoint_bytes(30))
            pruned_first.done = True
        return get(store, name, path)
    pruned_first.done = False
    monkeypatch.setattr(objstore.Store, "get", pruned_first)
    step, loaded = objstore.find_to_read(s3.url, -1, "sample from")
    assert pruned_first.done and step == 30 and equal(loaded, state(30))
    monkeypatch.setattr(objstore.Store, "get", get)
    mirror, _ = start(s3.url, keep_last=1)
    reader = subprocess.Popen([sys.executable, "-c", READER, s3.url, "5"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, cwd=HERE)
    step = 30
    while reader.poll() is None:  # a step every 0.2 s, each deleting the one before
        step += 10
        train(mirror, [step], n=1 << 16)
        time.sleep(0.2)
    mirror.close()
    out, err = reader.communicate()
    assert reader.returncode == 0 and b"error" not in err, err
    assert len(out.split()) == 5 and all(int(s) % 10 == 0 for s in out.split())


def checkpoint_bytes(step, n=16):
    path = checkpoint.save(os.environ["GPT_RESUME_CACHE"], step, state(step, n))
    with open(path, "rb") as f:
        data = f.read()
    os.remove(path)
    return data


def test_no_credential_in_any_line_object_or_file(s3, tmp_path, monkeypatch):
    lines = []
    mirror, _ = start(s3.url, keep_last=1, log=lines.append)
    train(mirror, [10, 20])
    mirror.close()
    objstore.local_copy(s3.url)
    for key in s3.keys():
        assert SECRET.encode() not in s3.read(key) and TOKEN.encode() not in s3.read(key), key
    for root, _, names in os.walk(os.environ["GPT_RESUME_CACHE"]):
        for name in names:
            data = open(os.path.join(root, name), "rb").read()
            assert SECRET.encode() not in data and TOKEN.encode() not in data, name
    with pytest.raises(checkpoint.CheckpointError) as e:
        remote.Mirror("s3://no-such-bucket-here/run", 0, 0, log=lines.append)
    assert "NoSuchBucket" in str(e.value)
    errors = [str(e.value)]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://AKIA:{SECRET}@127.0.0.1:{free_port()}")
    for attempt in (lambda: remote.Mirror(s3.url, 0, 0, log=lines.append, give_up_s=0.5),
                    lambda: objstore.find_to_read(s3.url, -1, "sample from", lines.append, give_up_s=0.5)):
        with pytest.raises(checkpoint.CheckpointError) as e:
            attempt()
        errors.append(str(e.value))
    assert all("\n" not in line for line in errors) and "127.0.0.1" in errors[1]
    for line in errors + lines:
        assert SECRET not in line and TOKEN not in line, line


# --- train.py, sample.py, checkpoint.py and plot.py on an s3:// out_dir -------------------------------------------

def trainer(url, dataset, *flags, cache=None):
    """train.py as a process on out_dir=url, with the tiny model; cache: another machine's empty disk."""
    env = {**os.environ, "GPT_RESUME_CACHE": str(cache)} if cache else None
    return subprocess.run([sys.executable, "train.py", *TINY, f"--dataset={dataset}", f"--out_dir={url}", *flags],
                          cwd=HERE, capture_output=True, text=True, timeout=300, env=env)


def test_a_run_on_a_bucket_resumes_on_an_empty_disk_exactly_and_its_readers_read_it(s3, tmp_path, dataset):
    """train.py to step 20 on s3://..., then the same command on a machine whose disk is empty resumes step 20
    from the bucket and ends torch.equal to an unbroken run; a second trainer on the prefix is refused in one line
    naming the holder; sample.py, checkpoint.py and plot.py read the URL; no secret is printed anywhere."""
    flags = ["--checkpoint_interval=10", "--keep_last_checkpoints=2"]
    first = trainer(s3.url, dataset, "--max_iters=20", *flags)
    assert first.returncode == 0, first.stderr
    assert "ckpt_0000020.pt" in s3.keys() and "metrics.jsonl" in s3.keys()
    resumed = trainer(s3.url, dataset, "--max_iters=30", *flags, cache=tmp_path / "empty-disk")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.startswith("resuming from step 20"), resumed.stdout
    unbroken = tmp_path / "unbroken"
    run(unbroken, dataset, "--max_iters=30", *flags)
    from_bucket = tmp_path / "from-bucket.pt"
    from_bucket.write_bytes(s3.read("ckpt_0000030.pt"))
    assert_identical(checkpoint.load(str(from_bucket)), state_at(unbroken, 30))
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, '.'); import remote; "
                               f"m = remote.Mirror({s3.url!r}, 0, 0); print('held', flush=True); time.sleep(60)"],
                              cwd=HERE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        second = trainer(s3.url, dataset, "--max_iters=40", *flags, cache=tmp_path / "third-disk")
        assert second.returncode == 2 and len(second.stderr.strip().splitlines()) == 1, second.stderr
        assert f"pid {holder.pid}" in second.stderr, second.stderr
    finally:
        holder.kill()
        holder.wait()
    sampled = subprocess.run([sys.executable, "sample.py", f"--out_dir={s3.url}", "--num_samples=1",
                              "--max_new_tokens=5", "--device=cpu"], cwd=HERE, capture_output=True, text=True)
    assert sampled.returncode == 0 and "ckpt_0000030" in sampled.stderr, sampled.stderr
    listed = subprocess.run([sys.executable, "checkpoint.py", s3.url], cwd=HERE, capture_output=True, text=True)
    assert listed.returncode == 0 and "30" in listed.stdout and " ok" in listed.stdout, listed.stdout + listed.stderr
    plotted = subprocess.run([sys.executable, "plot.py", s3.url, f"--output={tmp_path / 'loss.png'}"], cwd=HERE,
                             capture_output=True, text=True)
    assert plotted.returncode == 0 and (tmp_path / "loss.png").exists(), plotted.stderr
    for done in (first, resumed, second, sampled, listed, plotted):
        assert SECRET not in done.stdout + done.stderr and TOKEN not in done.stdout + done.stderr


def test_a_sharded_run_on_a_bucket_goes_up_folder_by_folder_and_resumes_on_an_empty_disk(s3, tmp_path, dataset):
    """fsdp=True on 2 ranks into s3://...: each step's folder goes up (run.pt last); the same job on a machine with
    an empty disk resumes the newest folder from the bucket and ends torch.equal to an unbroken sharded run."""
    flags = [*TINY, f"--dataset={dataset}", "--fsdp=True", "--checkpoint_interval=4"]
    codes, outputs = run_ranks(["train.py", *flags, f"--out_dir={s3.url}", "--max_iters=4"])
    assert codes == [0, 0], outputs[0][-3000:]
    assert "ckpt_0000004/run.pt" in s3.keys(), s3.keys()
    env = os.environ.get("GPT_RESUME_CACHE")
    os.environ["GPT_RESUME_CACHE"] = str(tmp_path / "empty-disk")
    try:
        codes, outputs = run_ranks(["train.py", *flags, f"--out_dir={s3.url}", "--max_iters=8"])
    finally:
        os.environ["GPT_RESUME_CACHE"] = env
    assert codes == [0, 0] and outputs[0].startswith("resuming from step 4"), outputs[0][-3000:]
    assert "ckpt_0000008/run.pt" in s3.keys(), s3.keys()
    codes, outputs = run_ranks(["train.py", *flags, f"--out_dir={tmp_path / 'unbroken'}", "--max_iters=8"])
    assert codes == [0, 0], outputs[0][-3000:]
    staging = objstore.staging_dir(s3.url).replace(os.environ["GPT_RESUME_CACHE"], str(tmp_path / "empty-disk"))
    assert_identical(checkpoint.load(checkpoint.path_for(staging, 8)),
                     checkpoint.load(checkpoint.path_for(str(tmp_path / "unbroken"), 8)))
