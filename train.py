"""
Train a GPT on one process or many. With no flags it trains a small character-level model on a CPU:

    python train.py
    python train.py config/train_shakespeare_char.py --from_checkpoint_step=2000
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py

Checkpoints land in out_dir as ckpt_<step>.pt; a resumed run computes exactly what an unbroken one would.
The batch of each step and the dropout masks of each micro-step are pure functions of (seed, step, position
in the global batch), so resuming needs no data-loader or RNG state, and 1 or N ranks see the same data.
"""
import difflib
import fcntl
import functools
import hashlib
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
from configurator import ConfigError, parse, run_main
from export import GPT2_HUB_NAMES, load_hf_gpt2
from model import GPT, GPTConfig

CONFIG = [  # (key, default, what it sets); `python train.py --help` prints this table
    ("out_dir", "out", "folder for ckpt_<step>.pt files"),
    ("from_checkpoint_step", -1, "-1: resume the newest checkpoint in out_dir, if any; N: resume step N; 0: start fresh"),
    ("init_from", "scratch", "a fresh start's weights: scratch, gpt2[-medium|-large|-xl], a Hugging Face GPT-2 folder, "
                             "or another run's checkpoint file or out_dir[:step]; 'resume', nanoGPT's word, is scratch"),
    ("eval_only", False, "evaluate the checkpoint a resume would pick (or init_from's weights), print the losses, exit"),
    ("checkpoint_interval", 250, "save a checkpoint every this many steps, and at the last step"),
    ("async_checkpoint", True, "write checkpoints in a background thread; the loop waits only for a host copy"),
    ("keep_last_checkpoints", 3, "keep the newest this many checkpoints, delete older ones; 0 keeps all"),
    ("keep_every", 0, "also keep, for good, checkpoints of steps divisible by this; 0: none"),
    ("keep_best", True, "also keep the checkpoint with the best val loss"),
    ("always_save_checkpoint", True, "nanoGPT's key: False also saves at each evaluation that lowers the best val loss"),
    ("eval_interval", 250, "estimate train/val loss every this many steps, and at the last step"),
    ("eval_iters", 20, "batches per loss estimate"),
    ("log_interval", 10, "print loss, lr, ms/step, tokens/s and MFU every this many steps, and add them to metrics.jsonl"),
    ("wandb_log", False, "also log to Weights & Biases (pip install wandb); a resume continues the same wandb run"),
    ("wandb_project", "gpt-resume", "wandb project"),
    ("wandb_run_name", "run", "wandb run name"),
    ("dataset", "python_char", "a folder under data/, or a path to one, with train.bin, val.bin and meta.json"),
    ("batch_size", 16, "sequences per micro-batch on each rank"),
    ("block_size", 64, "context length in tokens"),
    ("gradient_accumulation_steps", 1, "micro-batches per optimizer step, summed over all ranks"),
    ("n_layer", 4, "transformer blocks"),
    ("n_head", 4, "attention heads per block"),
    ("n_embd", 128, "embedding width; a multiple of n_head"),
    ("dropout", 0.0, "dropout probability; 0.0 for pretraining, 0.1+ for finetuning"),
    ("bias", False, "biases in Linear and LayerNorm layers, as GPT-2 has"),
    ("vocab_size", None, "None: meta.json's vocab_size; GPT-2 runs pad 50257 to 50304, a multiple of 64, for speed"),
    ("learning_rate", 1e-3, "peak learning rate, reached after warmup"),
    ("max_iters", 2000, "optimizer steps in the whole run; it ends after step max_iters"),
    ("weight_decay", 0.1, "AdamW weight decay, on matrices and embeddings only"),
    ("beta1", 0.9, "AdamW beta1"),
    ("beta2", 0.99, "AdamW beta2"),
    ("grad_clip", 1.0, "clip the gradient norm at this value; 0.0 disables"),
    ("warmup_iters", 100, "steps of linear warmup from 0"),
    ("lr_decay_iters", 2000, "step at which the cosine decay reaches min_lr; about max_iters"),
    ("min_lr", 1e-4, "learning rate after lr_decay_iters; about learning_rate/10"),
    ("decay_lr", True, "warmup, then cosine decay; False: learning_rate throughout"),
    ("device", "auto", "auto (cuda when available, else cpu), cpu, cuda, cuda:N or mps"),
    ("dtype", "auto", "auto (bfloat16 on a GPU that has it, else float16 with loss scaling; float32 on CPU), float32, bfloat16 or float16"),
    ("deterministic", False, "deterministic GPU kernels, so a resumed GPU run equals an unbroken one bit for bit; slower"),
    ("compile", None, "torch.compile the model; None: on for CUDA only"),
    ("backend", "auto", "nanoGPT's key, for its config files: gradients go over NCCL on CUDA, gloo on CPU, whatever it says"),
    ("seed", 1337, "seeds the initial weights, the batches and dropout"),
]
SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size")  # a resumed model takes these from its checkpoint
RUN_KEYS = ("out_dir", "from_checkpoint_step", "init_from", "eval_only")  # this command's alone: a resume takes every other key from the checkpoint
DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
RERUN = {False: "the same command", True: "it without --from_checkpoint_step, which would rewind again,"}  # by: rewound?
TRAIN_STREAM, EVAL_STREAM, DROPOUT_STREAM = 0, 1, 2  # keep the three uses of the seed independent
TOKEN_DTYPES = ("uint16", "uint32")  # what meta.json's "dtype" may say; uint16 when it says nothing
# dense bf16 (or fp16) peak FLOP/s by the words of torch.cuda.get_device_name, for MFU; the first match wins
PEAK_FLOPS = [(("H100", "PCIe"), 756e12), (("H100", "NVL"), 835e12), (("H100",), 989e12), (("H200",), 989e12),
              (("GH200",), 989e12), (("B200",), 2250e12), (("A100",), 312e12), (("A10",), 125e12), (("L40S",), 362e12),
              (("L4",), 121e12), (("4090",), 165e12), (("3090",), 71e12), (("V100",), 125e12), (("T4",), 65e12)]


def check_config(cfg, world_size, local_rank):
    """Reject bad values and combinations before anything is started or written."""
    for key in ("batch_size", "block_size", "gradient_accumulation_steps", "n_layer", "n_head", "n_embd",
                "max_iters", "eval_iters", "eval_interval", "log_interval", "checkpoint_interval"):
        if cfg[key] <= 0:
            raise ConfigError(f"{key} must be positive, got {cfg[key]}")
    for key in ("learning_rate", "min_lr", "weight_decay", "grad_clip", "warmup_iters", "lr_decay_iters",
                "keep_last_checkpoints", "keep_every"):
        if cfg[key] < 0:
            raise ConfigError(f"{key} must not be negative, got {cfg[key]}")
    if cfg["n_embd"] % cfg["n_head"]:
        raise ConfigError(f"n_embd={cfg['n_embd']} must be divisible by n_head={cfg['n_head']}")
    if not 0.0 <= cfg["dropout"] < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {cfg['dropout']}")
    if not (0.0 <= cfg["beta1"] < 1.0 and 0.0 <= cfg["beta2"] < 1.0):
        raise ConfigError(f"beta1 and beta2 must be in [0, 1), got {cfg['beta1']} and {cfg['beta2']}")
    if cfg["warmup_iters"] > cfg["lr_decay_iters"]:
        raise ConfigError(f"warmup_iters={cfg['warmup_iters']} must not exceed lr_decay_iters={cfg['lr_decay_iters']}")
    if not 0 <= cfg["seed"] < 2 ** 63:  # numpy's and torch's generators both take it
        raise ConfigError(f"seed must be in [0, 2**63), got {cfg['seed']}")
    if cfg["gradient_accumulation_steps"] % world_size:
        raise ConfigError(f"gradient_accumulation_steps={cfg['gradient_accumulation_steps']} must be divisible "
                          f"by the number of ranks, {world_size}")
    if cfg["vocab_size"] is not None and (type(cfg["vocab_size"]) is not int or cfg["vocab_size"] <= 0):
        raise ConfigError(f"vocab_size must be None or a positive int, got {cfg['vocab_size']!r}")
    if not (cfg["compile"] is None or isinstance(cfg["compile"], bool)):
        raise ConfigError(f"compile must be None, True or False, got {cfg['compile']!r}")
    check_device(cfg["device"], cfg["dtype"], local_rank)


def check_run_keys(cfg):
    """The keys that pick the run and the checkpoint: checked first, since the others may come from it."""
    if not cfg["out_dir"]:
        raise ConfigError("out_dir must not be empty")
    if cfg["from_checkpoint_step"] < -1:
        raise ConfigError(f"from_checkpoint_step must be -1 (newest), 0 (fresh) or a step, got {cfg['from_checkpoint_step']}")
    path = os.path.abspath(cfg["out_dir"])
    while not os.path.exists(path):  # out_dir must be a folder we can write in, or creatable; nothing is created here
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise ConfigError(f"out_dir {cfg['out_dir']}: {path} is not a folder")
    if not cfg["eval_only"] and not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"out_dir {cfg['out_dir']}: {path} is not writable")


def check_device(device, dtype, local_rank=None):
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    resolve_device(device, local_rank)


def resolve_device(requested, local_rank=None, cuda_count=None, mps_available=None):
    """The torch.device that `requested` (auto, cpu, cuda, cuda:N, mps) names on this machine; local_rank is set
    under torchrun. cuda_count and mps_available default to what this machine has: tests pass them, so every
    case runs on a CPU. Creates no CUDA context."""
    cuda_count = torch.cuda.device_count() if cuda_count is None else cuda_count
    mps_available = torch.backends.mps.is_available() if mps_available is None else mps_available
    name = ("cuda" if cuda_count else "cpu") if requested == "auto" else requested
    kind, colon, index = name.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (colon and (kind != "cuda" or not index.isdigit())):
        raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps, got {requested!r}")
    if kind == "mps" and not mps_available:
        raise ConfigError(f"device={requested} but MPS is not available in this build of torch on this machine")
    if kind == "mps" and local_rank is not None:
        raise ConfigError("device=mps cannot run under torchrun: DDP needs cuda or cpu")
    if kind != "cuda":
        return torch.device(kind)
    if not cuda_count:
        raise ConfigError(f"device={requested} but CUDA is not available on this machine")
    if local_rank is not None:
        if index:  # every rank would pile onto GPU N
            raise ConfigError(f"device={requested}: under torchrun each rank takes the GPU of its LOCAL_RANK; "
                              f"pass device=cuda, and choose GPUs with CUDA_VISIBLE_DEVICES")
        if local_rank >= cuda_count:
            raise ConfigError(f"LOCAL_RANK={local_rank} but this machine has {cuda_count} GPU(s): "
                              f"lower --nproc_per_node")
        return torch.device("cuda", local_rank)
    if index and int(index) >= cuda_count:
        raise ConfigError(f"device={requested} but this machine has {cuda_count} GPU(s): cuda:0 to cuda:{cuda_count - 1}")
    # "cuda" is the current device, which CUDA_VISIBLE_DEVICES selects; an explicit index makes set_device work
    return torch.device("cuda", int(index) if index else 0)


def resolve_dtype(requested, device, bf16_supported):
    """auto: bfloat16 on a GPU that supports it, else float16 (with the GradScaler) on a GPU, float32 elsewhere."""
    if requested == "auto":
        return ("bfloat16" if bf16_supported else "float16") if device.type == "cuda" else "float32"
    if requested == "bfloat16" and device.type == "cuda" and not bf16_supported:
        raise ConfigError("dtype=bfloat16 but this GPU does not support it: use float16 (or auto)")
    return requested


def setup_runtime(device, dtype, deterministic=False, local_rank=None):
    """Everything about the device, in one place and before anything touches CUDA: determinism, TF32, the
    current GPU. Returns the device, the resolved dtype's name, and the autocast context of forward passes."""
    # deterministic kernels, torch.compile's included, must be chosen before cuBLAS starts
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # use_deterministic_algorithms imports inductor, which takes seconds: only when the mode changes
    if deterministic != torch.are_deterministic_algorithms_enabled():
        torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    if deterministic or "torch._inductor.config" in sys.modules:
        importlib.import_module("torch._inductor.config").deterministic = deterministic
    device = resolve_device(device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: the speed-up nanoGPT takes; deterministic too
        torch.backends.cudnn.allow_tf32 = True
    dtype = resolve_dtype(dtype, device, device.type == "cuda" and torch.cuda.is_bf16_supported())
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    return device, dtype, nullcontext() if ptdtype == torch.float32 else torch.autocast(device.type, dtype=ptdtype)


def peak_flops(device, name=None):
    """The GPU's dense bf16 peak from PEAK_FLOPS by its name (CUDA's, unless given), or None (MFU prints n/a) for
    a CPU or a GPU not in the table."""
    if device.type != "cuda":
        return None
    words = set((torch.cuda.get_device_name(device) if name is None else name).replace("-", " ").split())
    return next((flops for key, flops in PEAK_FLOPS if words.issuperset(key)), None)


def dataset_dir(name):
    return name if os.sep in name or name.startswith(".") else os.path.join(DATA_DIR, name)


def load_dataset(name, block_size, trained_on=None):
    """Prepare the dataset if it is not yet (one process at a time: torchrun's ranks queue on a lock, and the
    first prepares), check all that training relies on, and return (meta, train, val, fingerprint). The
    fingerprint (vocabulary, token dtype, sizes, a hash of meta.json and of 32 spread 64 KiB blocks per file)
    identifies the data cheaply, even for 17 GB files. trained_on, a resume's (step, fingerprint): other data
    is refused, and the same data skips the scan of every token id, done when the run began."""
    folder = dataset_dir(name)
    paths = [os.path.join(folder, f) for f in ("train.bin", "val.bin", "meta.json")]
    prepare = os.path.join(folder, "prepare.py")
    if not all(map(os.path.exists, paths)) and os.path.exists(prepare):
        try:
            with open(os.path.join(folder, "prepare.lock"), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not all(map(os.path.exists, paths)):  # or another process prepared it while we waited
                    print(f"dataset {name} is not prepared yet: running {prepare}")
                    done = subprocess.run([sys.executable, prepare], capture_output=True, text=True)
                    if done.returncode:
                        last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
                        raise ConfigError(f"dataset {name}: {prepare} failed: {last}")
        except OSError as e:
            raise ConfigError(f"dataset {name}: cannot prepare it in {folder}: {e.strerror}") from None
    missing = [f for f in paths if not os.path.exists(f)]
    if missing:
        close = difflib.get_close_matches(name, os.listdir(DATA_DIR), n=1) if folder == os.path.join(DATA_DIR, name) else []
        raise ConfigError(f"dataset {name}: missing {', '.join(missing)}" + (f" (did you mean {close[0]}?)" if close else ""))
    try:
        with open(paths[2], "rb") as f:
            meta_bytes = f.read()
        meta = json.loads(meta_bytes)
        assert type(meta["vocab_size"]) is int and meta["vocab_size"] > 0
    except (ValueError, KeyError, TypeError, AssertionError):
        raise ConfigError(f"dataset {name}: {paths[2]} has no positive integer vocab_size") from None
    if meta.get("dtype", "uint16") not in TOKEN_DTYPES:
        raise ConfigError(f"dataset {name}: meta.json's dtype must be uint16 or uint32, got {meta['dtype']!r}")
    dtype = np.dtype(meta.get("dtype", "uint16"))
    if meta["vocab_size"] > np.iinfo(dtype).max + 1:
        raise ConfigError(f"dataset {name}: vocab_size {meta['vocab_size']} does not fit {dtype} token ids; "
                          f"meta.json must say \"dtype\": \"uint32\"")
    digest, arrays = hashlib.sha256(meta_bytes), []
    for path in paths[:2]:
        size = os.path.getsize(path)
        if size % dtype.itemsize or size // dtype.itemsize <= block_size:
            raise ConfigError(f"dataset {name}: {path} is {size} bytes: not a whole number of {dtype} tokens, "
                              f"or fewer than block_size+1 = {block_size + 1} of them")
        data = np.memmap(path, dtype=dtype, mode="r")
        for i in np.linspace(0, max(len(data) - (1 << 15), 0), 32).astype(np.int64):
            digest.update(data[i:i + (1 << 15)].tobytes())
        arrays.append(data)
    fingerprint = {"vocab_size": meta["vocab_size"], "dtype": str(dtype), "train.bin bytes": os.path.getsize(paths[0]),
                   "val.bin bytes": os.path.getsize(paths[1]), "sampled sha256": digest.hexdigest()}
    step, known = trained_on or (None, None)
    if known is not None and known != fingerprint:
        changes = [f"{k} {known.get(k)} -> {v}" for k, v in fingerprint.items() if known.get(k) != v]
        raise ConfigError(f"dataset {name} is not the data step {step} was trained on ({'; '.join(changes)}); "
                          f"to train these weights on other data, start a new run")
    if known is None:  # every id once, so that no batch indexes past the embedding mid-run
        for path, data in zip(paths, arrays):
            top = max(int(data[i:i + (1 << 26)].max()) for i in range(0, len(data), 1 << 26))
            if top >= meta["vocab_size"]:
                raise ConfigError(f"dataset {name}: {path} holds token id {top}, outside meta.json's vocab_size "
                                  f"{meta['vocab_size']}; prepare the dataset again")
    return meta, arrays[0], arrays[1], fingerprint


def batch_starts(seed, stream, step, rows, n_tokens, block_size):
    """Where each row of the global batch of `step` starts: a pure function of the arguments, so every rank
    and every resumed run draws exactly the same global batch."""
    return np.random.default_rng([seed, stream, step]).integers(0, n_tokens - block_size, size=rows)


def get_batch(data, starts, block_size, device):
    """x, y: (len(starts), block_size) int64 token ids on device; y is x shifted by one."""
    x = torch.from_numpy(np.stack([data[i:i + block_size] for i in starts]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size] for i in starts]).astype(np.int64))
    if device.type == "cuda":  # pinned memory lets the copy overlap with compute
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def micro_seed(seed, step, micro_step):
    """The dropout seed of one micro-step, the same whichever rank runs it and however the run was resumed."""
    return int(np.random.SeedSequence([seed, DROPOUT_STREAM, step, micro_step]).generate_state(1, np.uint64)[0])


def get_lr(step, cfg):
    """Learning rate of the update from `step` to step+1: linear warmup, then cosine decay to min_lr."""
    if not cfg["decay_lr"]:
        return cfg["learning_rate"]
    if step < cfg["warmup_iters"]:
        return cfg["learning_rate"] * (step + 1) / (cfg["warmup_iters"] + 1)
    if step >= cfg["lr_decay_iters"]:
        return cfg["min_lr"]
    ratio = (step - cfg["warmup_iters"]) / (cfg["lr_decay_iters"] - cfg["warmup_iters"])
    return cfg["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg["learning_rate"] - cfg["min_lr"])


def init_weights(cfg, given):
    """A fresh start's weights, init_from: GPT-2's released ones (a hub name or a Hugging Face folder) or another
    run's checkpoint (a file, or an out_dir with an optional :step). The model takes their shape where this command
    does not set it (a smaller block_size crops the position table). Returns a dict: model_args, weights, origin
    (a description) and vocab."""
    source = cfg["init_from"]
    if source in GPT2_HUB_NAMES or os.path.isfile(os.path.join(source, "config.json")):
        try:
            model_args, weights = load_hf_gpt2(source)
        except (ValueError, OSError, ImportError) as e:
            raise ConfigError(f"init_from={source}: {e}") from None
        init = {"model_args": model_args, "weights": weights, "origin": f"Hugging Face GPT-2 {source}", "vocab": {"tokenizer": "gpt2"}}
    else:
        folder, colon, step = source.rpartition(":")
        if not (colon and step.isdigit()):
            folder, step = source, "-1"
        if os.path.isfile(source):
            state = checkpoint.load(source)
        elif os.path.isdir(folder):
            state = checkpoint.find(folder, int(step), warn=print)[1]
            if state is None:
                raise ConfigError(f"init_from={source}: no checkpoint in {folder}")
        else:
            raise ConfigError(f"init_from={source}: not scratch, {', '.join(GPT2_HUB_NAMES)}, a Hugging Face GPT-2 "
                              f"folder, or a checkpoint file or out_dir")
        init = {"model_args": state["model_args"], "weights": state["model"], "origin": f"{source} (step {state['step']})",
                "vocab": state["meta"]}
    for key in SHAPE_KEYS:
        theirs = init["model_args"][key]
        if key in given and cfg[key] != theirs and not (key == "block_size" and cfg[key] < theirs):
            raise ConfigError(f"{key}={cfg[key]!r} contradicts init_from's model, which has {key}={theirs!r}")
        if key not in given:
            cfg[key] = theirs
    return init


def metrics_path(folder):
    return os.path.join(folder, "metrics.jsonl")


def trim_metrics(out_dir, step, abandoned):
    """metrics.jsonl is the history of the live timeline: its lines past `step` (of an abandoned timeline, or of
    steps a crash lost, which this run computes again) leave it, into the abandoned folder when there is one;
    a last line that a crash cut short is dropped."""
    if not os.path.exists(metrics_path(out_dir)):
        return
    kept, past = [], []
    with open(metrics_path(out_dir)) as f:
        for line in f:
            try:
                entry = json.loads(line)
            except ValueError:
                entry = None
            if entry is not None and line.endswith("\n"):  # else the last line, which a crash cut short
                # a start or resume marked at `step` is marked anew by this run
                (past if entry["step"] > step or (entry["step"] == step and "event" in entry) else kept).append(line)
    for folder, lines in ((abandoned, past), (out_dir, kept)):
        if folder is not None:
            with open(metrics_path(folder) + ".tmp", "w") as f:
                f.writelines(lines)
            os.replace(metrics_path(folder) + ".tmp", metrics_path(folder))


def resolve_start(cfg, ddp, master, cleanup):
    """Rank 0 locks out_dir (one run per folder; eval_only only reads) and picks the checkpoint to resume; it tells
    the other ranks, so every rank resumes the same step. Returns (step, state or None, whether out_dir is locked)."""
    choice, state, locked = [0, None], None, False  # (step, error message)
    if master:
        try:
            if os.path.isdir(cfg["out_dir"]) and not cfg["eval_only"]:  # else the folder is locked when writing starts
                locked = bool(cleanup.enter_context(checkpoint.lock(cfg["out_dir"])))
            choice[0], state = checkpoint.find(cfg["out_dir"], cfg["from_checkpoint_step"], warn=print)
        except checkpoint.CheckpointError as e:
            choice[1] = str(e)
    if ddp:
        dist.broadcast_object_list(choice, src=0)
    if choice[1]:
        raise checkpoint.CheckpointError(choice[1])
    if choice[0] and state is None:
        state = checkpoint.load(checkpoint.path_for(cfg["out_dir"], choice[0]))
    return choice[0], state, locked


def continue_run(cfg, given, state):
    """A resume continues the same run: every key but RUN_KEYS comes from the checkpoint's config unless this
    command sets it, and the model has the checkpoint's shape. Updates cfg; returns what the command changed."""
    changed = [f"{k}: {state['config'].get(k)!r} -> {cfg[k]!r}" for k in sorted(given - set(RUN_KEYS))
               if k in state["config"] and state["config"][k] != cfg[k]]
    cfg |= {k: v for k, v in state["config"].items() if k in cfg and k not in given and k not in RUN_KEYS}
    for key in SHAPE_KEYS:
        if key in given and cfg[key] != state["model_args"][key]:
            raise ConfigError(f"{key}={cfg[key]!r} contradicts checkpoint step {state['step']}, "
                              f"whose model has {key}={state['model_args'][key]!r}")
        cfg[key] = state["model_args"][key]
    return changed


def open_out_dir(cfg, step, locked, cleanup):
    """Rank 0, once every check has passed: lock a new out_dir, delete what a crash left, set aside the checkpoints
    of an abandoned timeline (a rewind) and trim metrics.jsonl to this one. Returns (the abandoned folder or None,
    metrics.jsonl opened to append)."""
    out_dir = cfg["out_dir"]
    try:
        if not locked:  # a new out_dir: lock it, and make sure no other run got there first
            os.makedirs(out_dir, exist_ok=True)
            cleanup.enter_context(checkpoint.lock(out_dir))
            if checkpoint.list_steps(out_dir):
                raise checkpoint.CheckpointError(f"out_dir {out_dir} got checkpoints from another run meanwhile")
        checkpoint.remove_temporaries(out_dir)
        abandoned = checkpoint.set_aside_newer(out_dir, step)
        trim_metrics(out_dir, step, abandoned)
        return abandoned, cleanup.enter_context(open(metrics_path(out_dir), "a"))
    except OSError as e:
        raise checkpoint.CheckpointError(f"cannot prepare out_dir: {e.filename}: {e.strerror}") from None


def start_wandb(cfg, run_id, abandoned, log):
    """One wandb run per timeline: a resume continues the checkpoint's run; a fresh start or a rewind starts one."""
    import wandb
    if abandoned and run_id:
        log(f"wandb: run {run_id} keeps the abandoned steps; this timeline continues in a new run")
    try:
        return wandb.init(project=cfg["wandb_project"], name=cfg["wandb_run_name"], resume="allow", config=cfg,
                          id=run_id if run_id and not abandoned else uuid.uuid4().hex[:8])
    except Exception as e:  # not logged in, no network: wandb has many kinds of error
        raise ConfigError(f"wandb_log=True, but wandb cannot start: {type(e).__name__}: {' '.join(str(e).split())}; "
                          f"try WANDB_MODE=offline") from None


def record(metrics, wandb_run, step, **fields):
    """A line of metrics.jsonl (rank 0 only: the others have no file), and a wandb log when it is on. wandb drops
    steps it has seen, so the steps a crash lost and this run computes again are not logged twice."""
    if metrics is not None:
        metrics.write(json.dumps({"step": step, "time": time.time(), **fields}) + "\n")
        metrics.flush()
    if wandb_run is not None and "event" not in fields:
        wandb_run.log(fields, step=step)


def catch_stop_signals(cleanup):
    """SIGTERM and SIGUSR1 (what schedulers and spot instances send before taking the machine) and Ctrl-C ask the
    loop to save its step and end; returns the list of (signal, time) they add to. A second Ctrl-C stops at once; it
    must come a second after the first, since torchrun passes each Ctrl-C on to workers the terminal sent it to."""
    received = []

    def on_signal(signum, frame):
        if signum == signal.SIGINT and any(s == signum and time.time() - t > 1.0 for s, t in received):
            raise KeyboardInterrupt
        received.append((signum, time.time()))

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    cleanup.callback(lambda: [signal.signal(sig, handler) for sig, handler in previous.items()])
    return received


def save_checkpoint(saver, *, state, buffers, cfg, protect, abandon):
    """Copy state to host memory (all the loop waits for), then write it and prune on the saver thread. Returns
    the future of (path, pruned steps); setting `abandon` stops the write and leaves no file."""
    return saver.submit(checkpoint.publish, out_dir=cfg["out_dir"], step=state["step"],
                        state=checkpoint.snapshot(state, buffers), keep_last=cfg["keep_last_checkpoints"],
                        keep_every=cfg["keep_every"], protect=protect, abandon=abandon)


def finish_saves(in_flight, log):
    """Wait for the saves in flight (one at most) and say what they did; a failed save raises and stops the run."""
    while in_flight:
        path, pruned = in_flight.pop().result()
        log(f"saved {path}" + (f"; deleted steps {', '.join(map(str, pruned))}" if pruned else ""))


def wait_for_saver(saver, abandon, kind, error, traceback):
    """What ends the run (an ExitStack exit) waits for the save in flight; Ctrl-C, then or meanwhile, abandons it."""
    try:
        if kind is KeyboardInterrupt:
            abandon.set()
        saver.shutdown()
    except KeyboardInterrupt:
        abandon.set()
        saver.shutdown()
        raise


def build_model(cfg, model_args, device, dtype, init, state):
    """The model, its AdamW optimizer and float16's loss scaler: fresh from the seed, from init_from's weights
    (built in their shape, then cropped to block_size), or as the checkpoint's state left them."""
    torch.manual_seed(cfg["seed"])
    if init:
        model = GPT(GPTConfig(**init["model_args"] | {"dropout": cfg["dropout"]}))
        model.load_state_dict(init["weights"])
        model.crop_block_size(cfg["block_size"])
    else:
        model = GPT(GPTConfig(**model_args))
    model.to(device)
    optimizer = model.configure_optimizers(cfg["weight_decay"], cfg["learning_rate"], (cfg["beta1"], cfg["beta2"]), device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "float16")
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:  # the loaded groups carry the checkpoint's values: the config's win
            group["betas"] = (cfg["beta1"], cfg["beta2"])
        optimizer.param_groups[0]["weight_decay"] = cfg["weight_decay"]  # group 0 decays, group 1 never does
        if scaler.is_enabled() and state["scaler"]:  # a run that switches to float16 starts a new loss scale
            scaler.load_state_dict(state["scaler"])
    return model, optimizer, scaler


@torch.no_grad()
def estimate_loss(model, splits, cfg, device, autocast):
    """Mean loss of each split over the same eval_iters batches every time; eval mode: no dropout, no RNG used."""
    model.eval()
    out = {}
    for split, data in splits.items():
        losses = torch.zeros(cfg["eval_iters"])
        for k in range(cfg["eval_iters"]):
            starts = batch_starts(cfg["seed"], EVAL_STREAM, k, cfg["batch_size"], len(data), cfg["block_size"])
            with autocast:
                _, loss = model(*get_batch(data, starts, cfg["block_size"], device))
            losses[k] = loss.item()
        out[split] = losses.mean().item()
    model.train()
    return out


def main(argv):
    # ---- set-up: the config, the checkpoint to continue, the data, the model ----
    cfg, given = parse(CONFIG, argv)
    ddp = "RANK" in os.environ
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) if ddp else (0, 0, 1)
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    check_run_keys(cfg)
    with ExitStack() as cleanup:  # whatever ends the run, an error or Ctrl-C included, undoes what was set up
        if ddp:  # gloo carries the few control messages on any device; CUDA gradients get an NCCL group below
            dist.init_process_group(backend="gloo")
            cleanup.callback(dist.destroy_process_group)
        start_step, state, locked = resolve_start(cfg, ddp, master, cleanup)
        if state is not None:
            changed = continue_run(cfg, given, state)
            log(f"resuming from step {start_step}" + (f"; changed by this command: {'; '.join(changed)}" if changed else ""))
            if "init_from" in given:
                log(f"init_from applies to a fresh start only: this run resumes its own step {start_step}")
        else:
            log("starting fresh" + (f": no checkpoint in {cfg['out_dir']}" if cfg["from_checkpoint_step"] == -1 else ""))
        check_config(cfg, world_size, local_rank if ddp else None)
        init = init_weights(cfg, given) if state is None and cfg["init_from"] not in ("scratch", "resume") else None
        meta, train_data, val_data, data_id = load_dataset(cfg["dataset"], cfg["block_size"],
                                                           trained_on=state and (state["step"], state.get("data")))
        vocab_size = cfg["vocab_size"] or meta["vocab_size"]
        if vocab_size < meta["vocab_size"]:
            whose = " (init_from's model)" if init else ""
            raise ConfigError(f"vocab_size={vocab_size}{whose} is smaller than dataset {cfg['dataset']}'s {meta['vocab_size']}")
        if init and [init["vocab"].get(k) for k in ("chars", "tokenizer")] != [meta.get(k) for k in ("chars", "tokenizer")]:
            log(f"warning: dataset {cfg['dataset']}'s vocabulary is not init_from's: the weights will read its token ids "
                f"as other characters or words")
        if cfg["wandb_log"] and master and importlib.util.find_spec("wandb") is None:
            raise ConfigError("wandb_log=True needs wandb: pip install wandb")
        if cfg["backend"] != "auto":  # nanoGPT's key, which means nothing here, says so
            log(f"backend={cfg['backend']} (nanoGPT's key) changes nothing here: gradients go over NCCL on CUDA, gloo otherwise")
        device, dtype, autocast = setup_runtime(cfg["device"], cfg["dtype"], cfg["deterministic"], local_rank if ddp else None)

        model_args = {k: cfg[k] for k in SHAPE_KEYS} | {"vocab_size": vocab_size, "dropout": cfg["dropout"]}
        raw_model, optimizer, scaler = build_model(cfg, model_args, device, dtype, init, state)
        if init:
            log(f"starting from the weights of {init['origin']}")
        resumed = state or {}  # what else a run carries on from its checkpoint
        best_val_loss, tokens_seen = resumed.get("best_val_loss", float("inf")), resumed.get("tokens_seen", 0)
        best_saved, wandb_id = resumed.get("best_checkpoint"), resumed.get("wandb_run_id")
        origin = resumed.get("origin") or (init["origin"] if init else "scratch")
        state = init = resumed = None  # free the host copies
        use_compile = device.type == "cuda" if cfg["compile"] is None else cfg["compile"]
        fast_model = torch.compile(raw_model) if use_compile else raw_model
        if ddp:
            grads = dist.new_group(backend="nccl") if device.type == "cuda" else None
            model = DDP(fast_model, device_ids=[device.index] if device.type == "cuda" else None, process_group=grads)
        else:
            model = fast_model
        splits = {"train": train_data, "val": val_data}

        if cfg["eval_only"]:
            losses = estimate_loss(fast_model, splits, cfg, device, autocast)
            log(f"step {start_step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f} (eval_only: nothing written)")
            return
        if start_step >= cfg["max_iters"]:
            log(f"nothing to train: step {start_step} has reached max_iters={cfg['max_iters']}; raise --max_iters to train further")
            return
        log("config:\n" + "\n".join(f"  {k} = {v!r}" for k, v in cfg.items()) + f"\n  (device {device}, dtype {dtype})")
        if device.type == "cpu" and dtype != "float32":
            log(f"note: dtype={dtype} on a CPU runs under autocast, often several times slower than float32")

        # every check has passed: only now is anything written
        metrics = wandb_run = None
        if master:
            abandoned, metrics = open_out_dir(cfg, start_step, locked, cleanup)
            if abandoned:
                log(f"rewinding to step {start_step}: moved the newer checkpoints into {abandoned}")
            if cfg["wandb_log"]:
                wandb_run = start_wandb(cfg, wandb_id, abandoned, log)
                wandb_id = wandb_run.id
                cleanup.callback(wandb_run.finish)
        stop_signals = catch_stop_signals(cleanup)
        # checkpoints: the loop waits for a host copy, and this thread writes it (async_checkpoint=False: the loop
        # waits for that too). Whatever ends the run waits for the last save, unless Ctrl-C abandons it
        saver, abandon, in_flight, snapshot_buffers = ThreadPoolExecutor(max_workers=1), threading.Event(), [], {}
        cleanup.push(functools.partial(wait_for_saver, saver, abandon))

        # ---- the loop ----
        B, T, accum = cfg["batch_size"], cfg["block_size"], cfg["gradient_accumulation_steps"]
        local_accum = accum // world_size  # this rank's micro-steps: the ranks split the global batch
        tokens_per_step = accum * B * T
        flops_peak = peak_flops(device)
        stop_flag = torch.zeros(1, dtype=torch.int32)

        def batch(step, micro):
            """This rank's micro-batch `micro` of the global batch of `step`."""
            starts = batch_starts(cfg["seed"], TRAIN_STREAM, step, accum * B, len(train_data), T)
            first = (rank * local_accum + micro) * B
            return get_batch(train_data, starts[first:first + B], T, device)

        step = start_step
        log(f"{raw_model.get_num_params() / 1e6:.2f}M parameters; {tokens_per_step:,} tokens per step "
            f"({accum} x {B} x {T}, {world_size} rank{'s' if world_size > 1 else ''}); training to step {cfg['max_iters']}")
        if use_compile:
            log("compiling the model: the first step takes longer (about a minute for GPT-2 124M on a GPU)")
        record(metrics, wandb_run, step, event="resume" if start_step else "start")
        x, y = batch(step, 0)
        t0, steps_timed = time.time(), 0  # ms/step counts training alone, not evals or saves
        while step < cfg["max_iters"]:
            if ddp:  # the ranks vote on stopping while this step computes; the vote is read after the step
                stop_flag.fill_(1 if stop_signals else 0)
                stop_vote = dist.all_reduce(stop_flag, op=dist.ReduceOp.MAX, async_op=True)
            lr = get_lr(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for micro in range(local_accum):
                if ddp:  # all-reduce the gradients once, on the last micro-step
                    model.require_backward_grad_sync = micro == local_accum - 1
                torch.manual_seed(micro_seed(cfg["seed"], step, rank * local_accum + micro))
                with autocast:
                    _, loss = model(x, y)
                    loss = loss / local_accum  # DDP averages over ranks; this averages over micro-steps
                # fetch the next micro-batch while the GPU works on this one
                x, y = batch(step, micro + 1) if micro + 1 < local_accum else batch(step + 1, 0)
                scaler.scale(loss).backward()
            if cfg["grad_clip"] > 0.0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg["grad_clip"])
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            steps_timed += 1
            tokens_seen += tokens_per_step

            if ddp:  # the vote started at the top of this step: every rank stops after the same step
                stop_vote.wait()
            stop = bool(stop_flag.item()) if ddp else bool(stop_signals)
            last = step == cfg["max_iters"]
            do_log = step % cfg["log_interval"] == 0 or last or stop
            do_eval = master and (step % cfg["eval_interval"] == 0 or last)
            if do_log:
                loss_now = loss.item() * local_accum  # the one host-device sync of the loop; a micro-batch's loss
                dt = (time.time() - t0) / steps_timed
                mfu = raw_model.estimate_mfu(tokens_per_step / dt, flops_peak * world_size) if flops_peak else None
                left = int(dt * (cfg["max_iters"] - step))  # evals and saves come on top
                log(f"step {step}: loss {loss_now:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms/step, "
                    f"{tokens_per_step / dt:,.0f} tokens/s, mfu {'n/a' if mfu is None else f'{mfu * 100:.1f}%'}, "
                    f"{left // 3600}:{left // 60 % 60:02d}:{left % 60:02d} to go")
                record(metrics, wandb_run, step, loss=loss_now, lr=lr, ms_per_step=dt * 1000,
                       tokens_per_s=tokens_per_step / dt, tokens=tokens_seen, mfu=mfu)
            losses, improved = {}, False
            if do_eval:
                losses = estimate_loss(fast_model, splits, cfg, device, autocast)
                improved, best_val_loss = losses["val"] < best_val_loss, min(best_val_loss, losses["val"])
                log(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                record(metrics, wandb_run, step, train_loss=losses["train"], val_loss=losses["val"])
            # nanoGPT's always_save_checkpoint=False: also save where the val loss is the best yet
            do_save = master and (step % cfg["checkpoint_interval"] == 0 or last or stop
                                  or (improved and not cfg["always_save_checkpoint"]))
            if do_save or (in_flight and in_flight[0].done()):
                finish_saves(in_flight, log)  # one save at a time; a failed one raises here, a step after it failed
            if do_save:
                if losses and (best_saved is None or losses["val"] < best_saved[0]):
                    best_saved = [losses["val"], step]  # the checkpoint keep_best keeps
                ckpt = {
                    "model": raw_model.state_dict(),  # clean names: neither DDP's module. nor compile's _orig_mod.
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),
                    "step": step,
                    "config": cfg,  # as given: a resume on another machine resolves device and dtype anew
                    "model_args": model_args,
                    "meta": meta,  # the vocabulary, so sample.py needs nothing but the checkpoint
                    "data": data_id,  # a resume on other data is refused
                    # dropout is seeded from (seed, step, micro-step): config's seed is all its randomness needs
                    "best_val_loss": best_val_loss,
                    "tokens_seen": tokens_seen,
                    "train_loss": losses.get("train"),
                    "val_loss": losses.get("val"),
                    "best_checkpoint": best_saved,  # [val loss, step] of the best checkpoint so far
                    "origin": origin,  # the weights step 0 started from: scratch, GPT-2, or another run's
                    "wandb_run_id": wandb_id,
                    "written_at": time.time(),
                }
                keep = [start_step] + ([best_saved[1]] if cfg["keep_best"] and best_saved else [])  # never pruned
                in_flight.append(save_checkpoint(saver, state=ckpt, buffers=snapshot_buffers, cfg=cfg, protect=keep, abandon=abandon))
                if not cfg["async_checkpoint"]:
                    finish_saves(in_flight, log)
            if do_log or do_eval or do_save:
                t0, steps_timed = time.time(), 0
            if stop:
                log(f"stopped by a signal after step {step}; rerun {RERUN[cfg['from_checkpoint_step'] != -1]} to resume")
                break
        finish_saves(in_flight, log)  # the last checkpoint is on disk before the process exits
        if ddp:  # the ranks leave together, and DDP lets go of the group before it is destroyed: a rank that tore
            dist.barrier()  # gloo down while rank 0 still saved was once seen to abort at exit
            del model


if __name__ == "__main__":
    rewinds = any(a.startswith("--from_checkpoint_step=") and a != "--from_checkpoint_step=-1" for a in sys.argv)
    run_main(main, (checkpoint.CheckpointError,), interrupted="interrupted: stopped at once, without saving the "
             f"current step; rerun {RERUN[rewinds]} to resume")
