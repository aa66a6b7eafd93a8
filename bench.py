"""
What checkpoints cost, and how fast the loop runs, measured side by side in one run. A script, not a test:

    python bench.py                  # the GPU when there is one (bf16, torch.compile), else the CPU
    python bench.py --device=cpu --sizes=small --steps=3 --repeats=1   # a quick look

Sizes: a small model and GPT-2 124M (a 1.5 GB state with AdamW). For each it prints: training throughput of
train.py's loop against a plain nanoGPT-style loop over the same model and data, and with --deterministic=True
against without (what bit-exact GPU resumes cost), with the ratios; how long a checkpoint stalls the loop
(sync save, async save, a plain in-memory copy as the floor) and how much slower steps run while a background
save writes; save bandwidth against a raw write of the same bytes with fsync; launch-to-first-step of a fresh
and a resumed run, and load bandwidth against a raw read; checkpoint size against its tensors' bytes; and what an
upload to an object store costs (out_dir=s3://...): our mirror against a plain boto3 put_object of the same bytes, and
the loop's step times meanwhile against no upload and a local async save. The server is AWS_ENDPOINT_URL's (a bucket
of bench's own is made there, and deleted), else a moto_server started here; without boto3 or a server the row
says so and is skipped.
"""
import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from unittest import mock

import torch

import checkpoint
import objstore
import remote
import saver
from configurator import parse
from stops import run_main
from dataset import get_batch, load_dataset
from device import peak_flops, setup_runtime
from model import GPT, GPTConfig

CONFIG = [  # (key, default, what it sets)
    ("device", "auto", "auto (the GPU when there is one), cpu, cuda (the current GPU), cuda:N or mps"),
    ("dtype", "auto", "as train.py's: auto is bfloat16 on a GPU that has it (else float16), float32 on a CPU"),
    ("sizes", "small,gpt2", "which of small and gpt2 to measure"),
    ("steps", 0, "timed training steps per loop; 0: 20 for small, 6 on CPU (20 on a GPU) for gpt2"),
    ("repeats", 2, "times each side of a comparison is measured, keeping the best: noise only slows a run down"),
    ("bench_dir", "", "where checkpoints are written; '' makes a temporary folder"),
]
SIZES = {  # model shapes; batch shapes per device
    "small": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=128),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304),
}
HERE = os.path.dirname(os.path.abspath(__file__))
BATCH = {("small", "cpu"): (16, 64), ("small", "gpu"): (64, 64), ("gpt2", "cpu"): (1, 128), ("gpt2", "gpu"): (16, 1024)}


def timed(fn, sync):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


def raw_write(path, data):
    """Plain sequential writes with fsync: the disk's own speed for these very bytes (a virtual disk may
    compress or deduplicate, so a repeated block would flatter it)."""
    view = memoryview(data)
    with open(path, "wb") as f:
        for offset in range(0, len(data), 64 << 20):
            f.write(view[offset:offset + (64 << 20)])
        f.flush()
        os.fsync(f.fileno())


def raw_read(path):
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(64 << 20)
        while f.readinto(buf):
            pass


def plain_loop(model, data, B, T, device, autocast, compiled):
    """nanoGPT's loop, plainly: random batches, forward, backward, clip, AdamW step. Returns one step, warmed up."""
    optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), device.type)
    fast = torch.compile(model) if compiled else model

    def step():
        x, y = get_batch(data, torch.randint(len(data) - T, (B,)).tolist(), T, device)
        with autocast:
            _, loss = fast(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up: compile, allocator, AdamW state
        step()
    return step, optimizer


def shape_flags(size, device, dtype, B, T):
    return [f"--{k}={v}" for k, v in SIZES[size].items()] + [
        f"--device={device}", f"--dtype={dtype}", f"--batch_size={B}", f"--block_size={T}", "--eval_iters=1",
        "--warmup_iters=1"]


def our_loop(flags, steps, out_dir):
    """train.py's own loop, run as a user runs it: the ms/step of its last log line, over steps steps..2*steps."""
    done = subprocess.run([sys.executable, "train.py", *flags, f"--out_dir={out_dir}", f"--max_iters={2 * steps}",
                           f"--log_interval={steps}", f"--checkpoint_interval={2 * steps}",
                           f"--lr_decay_iters={2 * steps}", "--from_checkpoint_step=0"],
                          capture_output=True, text=True, cwd=HERE)
    if done.returncode:
        raise SystemExit(f"train.py failed: {flags}: {(done.stderr.strip().splitlines() or ['no output'])[-1]}")
    return float(re.findall(r"([\d.]+) ms/step", done.stdout)[-1]) / 1000


def launch_to_first_step(argv, first_step):
    """Seconds from starting `python train.py` to its log line for step first_step."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "train.py", *argv, "--log_interval=1"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=HERE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seconds = None
    for line in proc.stdout:
        if seconds is None and line.startswith(f"step {first_step}: loss"):
            seconds = time.perf_counter() - t0
    if proc.wait() or seconds is None:
        raise SystemExit(f"train.py failed: {argv}")
    return seconds


def steps_while(step, sync, start):
    """The loop's step times from start(), which begins a background write and returns a future of the moment it
    ends (start's own cost is the first step's), until that write has ended; and the write's seconds."""
    sync()
    began = time.perf_counter()
    ended = start()
    times = []
    last = began
    while not times or not ended.done():
        step()
        sync()
        now = time.perf_counter()
        times.append(now - last)
        last = now
    return times, ended.result() - began


def listening(port):
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def upload_rows(path, state, buffers, step, steps, sync, out_dir):
    """(what, ours, baseline, target) rows of uploading the checkpoint at path: our mirror (remote.Mirror, in the
    background) against one plain boto3 put_object of the same bytes (which the loop would wait for), each once;
    then the loop's step times while the mirror uploads, against `steps` steps with no upload and the steps while a
    local async save (saver.Saver, into buffers already allocated, as from a run's second save on) writes."""
    what = "upload to object store"
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    moto = shutil.which("moto_server")
    if importlib.util.find_spec("boto3") is None:
        return [(what, "skipped: no boto3 (pip install boto3)", "", "")]
    if not endpoint and moto is None:
        return [(what, 'skipped: no AWS_ENDPOINT_URL, nor moto_server to start (pip install "moto[server]")', "", "")]
    import boto3  # an optional extra, as for objstore.py
    from botocore.exceptions import BotoCoreError, ClientError
    env = {"GPT_RESUME_CACHE": os.path.join(out_dir, "cache")}  # the mirror's staging folder: in bench's own
    server = None
    if not endpoint:  # moto_server on a free loopback port, with fake credentials and no AWS config file
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        env |= {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull,
                "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_EC2_METADATA_DISABLED": "true"}
    bucket = f"bench-{uuid.uuid4().hex[:12]}"
    try:
        with mock.patch.dict(os.environ, env):
            deadline = time.monotonic() + 30
            while server is not None and not listening(port):
                if server.poll() is not None or time.monotonic() > deadline:
                    raise checkpoint.CheckpointError(f"moto_server did not start on 127.0.0.1:{port}")
                time.sleep(0.1)
            client = boto3.client("s3")
            client.create_bucket(Bucket=bucket)
            with open(path, "rb") as f:
                data = f.read()
            plain_s, _ = timed(lambda: client.put_object(Bucket=bucket, Key="plain.pt", Body=data), lambda: None)
            idle = [timed(step, sync)[0] for _ in range(steps)]

            saved = Future()
            cfg = {"keep_last_checkpoints": 0, "keep_every": 0, "async_checkpoint": True}
            with saver.Saver(out_dir, cfg, lambda: None, log=lambda line: None,
                             published=lambda p, protect: saved.set_result(time.perf_counter())) as writer:
                writer.buffers = buffers  # allocated by the snapshots above: a run's saves reuse theirs

                def save():
                    writer.save(state | {"step": 4}, ())
                    return saved
                saving, _ = steps_while(step, sync, save)

            mirror = remote.Mirror(f"s3://{bucket}/bench", 0, 0)  # as a run makes it: it takes the lock
            mirror.prepare(0)
            mirror.opened(0)
            with ThreadPoolExecutor(max_workers=1) as closer:
                def closed():
                    mirror.close()  # returns once the upload is in the bucket
                    return time.perf_counter()

                def upload():
                    mirror.published(path)  # all that the loop calls
                    return closer.submit(closed)
                uploading, upload_s = steps_while(step, sync, upload)
            mirror.check()  # a failed upload is one line, not a row
            for key in [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]:
                client.delete_object(Bucket=bucket, Key=key)
            client.delete_bucket(Bucket=bucket)
    except (BotoCoreError, ClientError) as e:  # no credentials, no such endpoint, access denied: one line
        where = env.get("AWS_ENDPOINT_URL", endpoint)
        raise checkpoint.CheckpointError(objstore.scrub(f"cannot upload to {where}: {e}")) from None
    finally:
        if server is not None:
            server.kill()
            server.wait()
    nbytes = len(data)
    rate = lambda seconds: f"{seconds:.2f} s, {nbytes / seconds / 1e6:,.0f} MB/s"
    ms = lambda times: f"{sum(times) / len(times) * 1e3:,.1f}/{max(times) * 1e3:,.1f}"
    return [(what, f"{nbytes / 1e6:,.1f} MB in {rate(upload_s)} (mirror, background)",
             f"{rate(plain_s)} (put_object, the loop waits)", ""),
            ("step time while it uploads", f"mean/max {ms(uploading)} ms ({len(uploading)} steps)",
             f"no upload {ms(idle)}; async save {ms(saving)}",
             "max <= async save's" + (" ok" if max(uploading) <= max(saving) else " MISSED"))]


def bench(size, device, dtype, autocast, steps, repeats, bench_dir, rows):
    on_gpu = device.type != "cpu"
    B, T = BATCH[(size, "gpu" if on_gpu else "cpu")]
    meta, data, _, _ = load_dataset("python_char", T)
    out_dir = os.path.join(bench_dir, size)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    add = lambda what, ours, baseline, target="": rows.append((size, what, ours, baseline, target))
    sync = {"cuda": torch.cuda.synchronize, "mps": torch.mps.synchronize}.get(device.type, lambda: None)

    # 1. throughput: train.py's loop with --deterministic=True and without, and the plain loop over the same model
    # shape and data; each timed `repeats` times, interleaved, keeping the fastest: noise only slows a run down
    flags = shape_flags(size, device, dtype, B, T)
    det = ours = base = float("inf")
    for r in range(repeats):
        det = min(det, our_loop(flags + ["--deterministic=True"], steps, os.path.join(out_dir, "det")))
        ours = min(ours, our_loop(flags, steps, os.path.join(out_dir, "loop")))
        if r == 0:
            torch.manual_seed(0)
            model = GPT(GPTConfig(**SIZES[size])).to(device)
            step, optimizer = plain_loop(model, data, B, T, device, autocast, device.type == "cuda")
        base = min(base, timed(lambda: [step() for _ in range(steps)], sync)[0] / steps)
    tokens, peak = B * T, peak_flops(device)

    def mfu(seconds):
        if not on_gpu:
            return ""
        return f", MFU {model.estimate_mfu(tokens / seconds, peak) * 100:.1f}%" if peak else ", MFU n/a"
    add("training tokens/s", f"{tokens / ours:,.0f}{mfu(ours)} ({base / ours:.2f}x plain)",
        f"{tokens / base:,.0f}{mfu(base)} (plain loop)",
        "ours >= plain" + (" ok" if ours <= base * 1.02 else " MISSED"))
    add("deterministic tokens/s", f"{tokens / det:,.0f}{mfu(det)} ({ours / det:.2f}x not deterministic)",
        f"{tokens / ours:,.0f} not deterministic")

    # 2. what a checkpoint stalls the loop: sync save, async save (the snapshot), a plain copy (the floor)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 1, "meta": meta,
             "model_args": {"bias": True, "dropout": 0.0} | SIZES[size]}  # GPTConfig's defaults, as built
    buffers = {}
    saver.snapshot(state, buffers)  # the first call allocates (pinned on a GPU) buffers that later saves reuse
    nbytes = sum(t.numel() * t.element_size() for t in buffers.values())  # each tensor once: tied weights are one
    floor, _ = timed(lambda: saver.snapshot(state), sync)  # new, unpinned memory: a plain copy
    sync_s, _ = timed(lambda: saver.publish(out_dir, 1, saver.snapshot(state, buffers), 0, 0, []), sync)
    async_s, snap = min((timed(lambda: saver.snapshot(state, buffers), sync) for _ in range(repeats)),
                        key=lambda r: r[0])
    add("stall per checkpoint", f"async {async_s * 1e3:,.0f} ms, sync {sync_s * 1e3:,.0f} ms",
        f"plain copy to host memory {floor * 1e3:,.0f} ms",
        "async <= 5% of sync" + (" ok" if async_s <= 0.05 * sync_s else " MISSED"))

    # steps while a background save writes, against steps with none
    with ThreadPoolExecutor(max_workers=1) as writer:
        idle, _ = timed(lambda: [step() for _ in range(steps)], sync)
        writing = writer.submit(saver.publish, out_dir, 2, snap, 0, 0, [])
        during, _ = timed(lambda: [step() for _ in range(steps)], sync)
        done_in_time = writing.done()
        writing.result()
    add("step time while a save writes", f"{during / steps * 1e3:,.1f} ms/step"
        + ("" if done_in_time else " (the save outlasted the steps)"), f"{idle / steps * 1e3:,.1f} ms/step idle")

    # 3. save bandwidth against a raw write of the same byte count
    path = checkpoint.path_for(out_dir, 1)
    size_on_disk = os.path.getsize(path)
    with open(path, "rb") as f:
        file_bytes = f.read()
    raw_s = save_s = float("inf")
    for _ in range(repeats):  # interleaved, the best of each: the disk's speed drifts
        raw_s = min(raw_s, timed(lambda: raw_write(os.path.join(out_dir, "raw.bin"), file_bytes), sync)[0])
        save_s = min(save_s, timed(lambda: checkpoint.save(out_dir, 3, snap), sync)[0])
    add("save bandwidth", f"{size_on_disk / save_s / 1e9:.2f} GB/s",
        f"{size_on_disk / raw_s / 1e9:.2f} GB/s raw write+fsync",
        ">= 85% of raw" + (" ok" if save_s <= raw_s / 0.85 else " MISSED"))

    # 4. resume: load bandwidth against a raw read (both from a warm page cache), and launch-to-first-step
    raw_read(path)
    read_s, _ = timed(lambda: raw_read(path), lambda: None)
    load_s, _ = timed(lambda: model.load_state_dict(checkpoint.load(path)["model"]), sync)
    add("load bandwidth", f"{size_on_disk / load_s / 1e9:.2f} GB/s (verify + load into the model)",
        f"{size_on_disk / read_s / 1e9:.2f} GB/s raw read")
    # compile off: its minutes would drown the difference between a fresh and a resumed start
    launch = flags + [f"--out_dir={os.path.join(out_dir, 'launch')}", "--checkpoint_interval=1", "--lr_decay_iters=2",
                      "--compile=False"]
    fresh = resumed = float("inf")
    for _ in range(repeats):  # interleaved, the best of each
        fresh = min(fresh, launch_to_first_step(launch + ["--max_iters=1", "--from_checkpoint_step=0"], 1))
        resumed = min(resumed, launch_to_first_step(launch + ["--max_iters=2", "--from_checkpoint_step=1"], 2))
    resumed_from = checkpoint.path_for(os.path.join(out_dir, "launch"), 1)
    raw_read(resumed_from)
    read1_s, _ = timed(lambda: raw_read(resumed_from), lambda: None)
    overhead = resumed - fresh
    add("launch to first step", f"resumed {resumed:.2f} s ({overhead:+.2f} s)",
        f"fresh {fresh:.2f} s; raw read {read1_s:.2f} s",
        "overhead <= 1.2x raw read" + (" ok" if overhead <= 1.2 * read1_s else " MISSED"))

    # 5. size against the tensors' own bytes
    add("checkpoint size", f"{size_on_disk / 1e6:,.1f} MB", f"{nbytes / 1e6:,.1f} MB of tensors",
        "<= 1.02x" + (" ok" if size_on_disk <= 1.02 * nbytes else " MISSED"))

    # 6. an upload to an object store (out_dir=s3://...) against a plain put, and the loop meanwhile
    for row in upload_rows(path, state, buffers, step, steps, sync, out_dir):
        add(*row)


def main(argv):
    cfg, _ = parse(CONFIG, argv)
    # the plain loop's set-up, as train.py's without --deterministic; train.py's runs are processes of their own
    device, dtype, autocast = setup_runtime(cfg["device"], cfg["dtype"])
    # absolute: train.py's runs start in this folder, wherever bench.py was started from
    bench_dir = os.path.abspath(cfg["bench_dir"]) if cfg["bench_dir"] else tempfile.mkdtemp(prefix="bench-", dir=HERE)
    rows = []
    try:
        for size in cfg["sizes"].split(","):
            torch._dynamo.reset()  # else a second size's new shapes would compile as dynamic ones, slower
            steps = cfg["steps"] or (20 if size == "small" or device.type != "cpu" else 6)
            bench(size, device, dtype, autocast, steps, cfg["repeats"], bench_dir, rows)
    finally:
        if not cfg["bench_dir"]:
            shutil.rmtree(bench_dir, ignore_errors=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" \
        else f"{device.type.upper()}, {os.cpu_count()} cores"
    print(f"bench.py on {name}, {dtype}, torch {torch.__version__}")
    widths = [max(len(r[i]) for r in rows + [("size", "what", "ours", "baseline", "target")]) for i in range(5)]
    for row in [("size", "what", "ours", "baseline", "target")] + rows:
        print(" | ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


if __name__ == "__main__":
    run_main(main, (checkpoint.CheckpointError,))
