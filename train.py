"""
Train a GPT on one process or many. With no flags it trains a small character-level model on a CPU:

    python train.py
    python train.py config/train_shakespeare_char.py --from_checkpoint_step=2000
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py

Checkpoints land in out_dir as ckpt_<step>.pt; a resumed run computes exactly what an unbroken one would.
The batch of each step and the dropout masks of each micro-step are pure functions of (seed, step, position
in the global batch), so resuming needs no data-loader or RNG state, and 1 or N ranks see the same data.
"""
import json
import math
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
from configurator import ConfigError, parse
from model import GPT, GPTConfig

CONFIG = [  # (key, default, what it sets); `python train.py --help` prints this table
    ("out_dir", "out", "folder for ckpt_<step>.pt files"),
    ("from_checkpoint_step", -1, "-1: resume the newest checkpoint in out_dir, if any; N: resume step N; 0: start fresh"),
    ("checkpoint_interval", 250, "save a checkpoint every this many steps, and at the last step"),
    ("async_checkpoint", True, "write checkpoints in a background thread; the loop waits only for a host copy"),
    ("keep_last_checkpoints", 3, "keep the newest this many checkpoints, delete older ones; 0 keeps all"),
    ("keep_every", 0, "also keep, for good, checkpoints of steps divisible by this; 0: none"),
    ("eval_interval", 250, "estimate train/val loss every this many steps, and at the last step"),
    ("eval_iters", 20, "batches per loss estimate"),
    ("log_interval", 10, "print loss, lr, ms/step, tokens/s and MFU every this many steps"),
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
    ("device", "auto", "auto (cuda when available, else cpu), cpu, cuda, cuda:N or mps"),
    ("dtype", "auto", "auto (bfloat16 where the GPU supports it, else float32), float32, bfloat16 or float16"),
    ("compile", None, "torch.compile the model; None: on for CUDA only"),
    ("seed", 1337, "seeds the initial weights, the batches and dropout"),
]
SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size")  # a resumed model takes these from its checkpoint
DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
TRAIN_STREAM, EVAL_STREAM, DROPOUT_STREAM = 0, 1, 2  # keep the three uses of the seed independent


def check_config(cfg, world_size):
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
    if cfg["from_checkpoint_step"] < -1:
        raise ConfigError(f"from_checkpoint_step must be -1 (newest), 0 (fresh) or a step, got {cfg['from_checkpoint_step']}")
    if cfg["gradient_accumulation_steps"] % world_size:
        raise ConfigError(f"gradient_accumulation_steps={cfg['gradient_accumulation_steps']} must be divisible "
                          f"by the number of ranks, {world_size}")
    if cfg["vocab_size"] is not None and (type(cfg["vocab_size"]) is not int or cfg["vocab_size"] <= 0):
        raise ConfigError(f"vocab_size must be None or a positive int, got {cfg['vocab_size']!r}")
    if cfg["compile"] not in (None, True, False):
        raise ConfigError(f"compile must be None, True or False, got {cfg['compile']!r}")
    check_device(cfg)


def check_device(cfg):
    if cfg["dtype"] not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16, got {cfg['dtype']!r}")
    if cfg["device"] != "auto" and cfg["device"].split(":")[0] not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps, got {cfg['device']!r}")
    if cfg["device"].startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={cfg['device']} but CUDA is not available on this machine")


def dataset_dir(name):
    return name if os.sep in name or name.startswith(".") else os.path.join(DATA_DIR, name)


def load_meta(name):
    """The dataset's meta.json; runs data/<name>/prepare.py first when the dataset has not been prepared yet."""
    folder = dataset_dir(name)
    files = [os.path.join(folder, f) for f in ("train.bin", "val.bin", "meta.json")]
    prepare = os.path.join(folder, "prepare.py")
    if not all(map(os.path.exists, files)) and os.path.exists(prepare):
        print(f"dataset {name} is not prepared yet: running {prepare}")
        done = subprocess.run([sys.executable, prepare], capture_output=True, text=True)
        if done.returncode:
            last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
            raise ConfigError(f"dataset {name}: {prepare} failed: {last}")
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        raise ConfigError(f"dataset {name}: missing {', '.join(missing)}")
    try:
        with open(files[2]) as f:
            meta = json.load(f)
        assert type(meta["vocab_size"]) is int
    except (ValueError, KeyError, TypeError, AssertionError):
        raise ConfigError(f"dataset {name}: {files[2]} has no integer vocab_size") from None
    return meta


def check_out_dir(out_dir):
    """out_dir must be a folder we can write in, or creatable; nothing is created here."""
    path = os.path.abspath(out_dir)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise ConfigError(f"out_dir {out_dir}: {path} is not a folder")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"out_dir {out_dir}: {path} is not writable")


def batch_starts(seed, stream, step, rows, n_tokens, block_size):
    """Where each row of the global batch of `step` starts: a pure function of the arguments, so every rank
    and every resumed run draws exactly the same global batch."""
    return np.random.default_rng([seed, stream, step]).integers(0, n_tokens - block_size, size=rows)


def get_batch(data, starts, block_size):
    """x, y: (len(starts), block_size) int64 token ids; y is x shifted by one."""
    x = torch.from_numpy(np.stack([data[i:i + block_size] for i in starts]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size] for i in starts]).astype(np.int64))
    return x, y


def micro_seed(seed, step, micro_step):
    """The dropout seed of one micro-step, the same whichever rank runs it and however the run was resumed."""
    return int(np.random.SeedSequence([seed, DROPOUT_STREAM, step, micro_step]).generate_state(1, np.uint64)[0])


def get_lr(step, cfg):
    """Learning rate of the update from `step` to step+1: linear warmup, then cosine decay to min_lr."""
    if step < cfg["warmup_iters"]:
        return cfg["learning_rate"] * (step + 1) / (cfg["warmup_iters"] + 1)
    if step >= cfg["lr_decay_iters"]:
        return cfg["min_lr"]
    ratio = (step - cfg["warmup_iters"]) / (cfg["lr_decay_iters"] - cfg["warmup_iters"])
    return cfg["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg["learning_rate"] - cfg["min_lr"])


def setup_device(cfg, local_rank=None):
    """Resolve cfg's device and dtype ("auto", or cuda under torchrun) in place; returns the device and the
    autocast context that forward passes run under."""
    if cfg["device"] == "auto":
        cfg["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    if local_rank is not None and cfg["device"] == "cuda":
        cfg["device"] = f"cuda:{local_rank}"  # one GPU per rank
    device = torch.device(cfg["device"])
    if cfg["dtype"] == "auto":
        cfg["dtype"] = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg["dtype"]]
    return device, nullcontext() if ptdtype == torch.float32 else torch.autocast(device.type, dtype=ptdtype)


def peak_flops(device):
    """Dense bf16 peak of the GPU, for MFU; None where unknown (CPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((f for key, f in (("H100", 989e12), ("H200", 989e12), ("A100", 312e12)) if key in name), 312e12)


def resolve_start(cfg, ddp, master):
    """Rank 0 picks the checkpoint to resume and tells the others, so every rank resumes the same step."""
    choice, state = [0, None], None  # (step, error message)
    if master:
        try:
            choice[0], state = checkpoint.find(cfg["out_dir"], cfg["from_checkpoint_step"], warn=print)
        except checkpoint.CheckpointError as e:
            choice[1] = str(e)
    if ddp:
        dist.broadcast_object_list(choice, src=0)
    if choice[1]:
        raise checkpoint.CheckpointError(choice[1])
    if choice[0] and state is None:
        state = checkpoint.load(checkpoint.path_for(cfg["out_dir"], choice[0]))
    return choice[0], state


def main(argv):
    cfg, given = parse(CONFIG, argv)
    ddp = "RANK" in os.environ
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) if ddp else (0, 0, 1)
    master = rank == 0
    check_config(cfg, world_size)
    meta = load_meta(cfg["dataset"])
    check_out_dir(cfg["out_dir"])

    device, autocast = setup_device(cfg, local_rank if ddp else None)
    if cfg["compile"] is None:
        cfg["compile"] = device.type == "cuda"
    if ddp:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: the same speed-up nanoGPT takes
        torch.backends.cudnn.allow_tf32 = True
    log = print if master else (lambda *a, **k: None)

    # the checkpoint to resume, chosen by rank 0; its model shape wins over defaults, never over an explicit flag
    start_step, state = resolve_start(cfg, ddp, master)
    if state is not None:
        for key in SHAPE_KEYS:
            if key in given and cfg[key] != state["model_args"][key]:
                raise ConfigError(f"{key}={cfg[key]!r} contradicts checkpoint step {start_step}, "
                                  f"whose model has {key}={state['model_args'][key]!r}")
            cfg[key] = state["model_args"][key]
        changed = [f"{k}: {state['config'].get(k)!r} -> {v!r}" for k, v in cfg.items()
                   if k != "from_checkpoint_step" and state["config"].get(k) != v]
        log(f"resuming from step {start_step}" + (f"; config differs from the checkpoint's: {'; '.join(changed)}" if changed else ""))
    else:
        log("starting fresh" + (f": no checkpoint in {cfg['out_dir']}" if cfg["from_checkpoint_step"] == -1 else ""))
    if cfg["vocab_size"] is None:
        cfg["vocab_size"] = meta["vocab_size"]
    if cfg["vocab_size"] < meta["vocab_size"]:
        raise ConfigError(f"vocab_size={cfg['vocab_size']} is smaller than dataset {cfg['dataset']}'s {meta['vocab_size']}")
    folder = dataset_dir(cfg["dataset"])
    B, T, accum = cfg["batch_size"], cfg["block_size"], cfg["gradient_accumulation_steps"]
    for name in ("train.bin", "val.bin"):
        if os.path.getsize(os.path.join(folder, name)) // 2 <= T:
            raise ConfigError(f"dataset {cfg['dataset']}: {name} has fewer than block_size+1 = {T + 1} tokens")
    train_data = np.memmap(os.path.join(folder, "train.bin"), dtype=np.uint16, mode="r")
    val_data = np.memmap(os.path.join(folder, "val.bin"), dtype=np.uint16, mode="r")
    log("config:\n" + "\n".join(f"  {k} = {v!r}" for k, v in cfg.items()))

    # every check has passed: only now is anything written
    if master:
        try:
            os.makedirs(cfg["out_dir"], exist_ok=True)
            checkpoint.remove_temporaries(cfg["out_dir"])
            abandoned = checkpoint.set_aside_newer(cfg["out_dir"], start_step)
        except OSError as e:
            raise checkpoint.CheckpointError(f"cannot prepare out_dir: {e.filename}: {e.strerror}") from None
        if abandoned:
            log(f"rewinding to step {start_step}: moved the newer checkpoints into {abandoned}")

    torch.manual_seed(cfg["seed"])
    model_args = {k: cfg[k] for k in SHAPE_KEYS} | {"dropout": cfg["dropout"]}
    raw_model = GPT(GPTConfig(**model_args)).to(device)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg["dtype"] == "float16")
    optimizer = raw_model.configure_optimizers(cfg["weight_decay"], cfg["learning_rate"], (cfg["beta1"], cfg["beta2"]), device.type)
    best_val_loss, tokens_seen = float("inf"), 0
    if state is not None:
        raw_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        best_val_loss, tokens_seen = state["best_val_loss"], state["tokens_seen"]
    state = None  # free the host copy
    fast_model = torch.compile(raw_model) if cfg["compile"] else raw_model
    model = DDP(fast_model, device_ids=[device.index] if device.type == "cuda" else None) if ddp else fast_model

    local_accum = accum // world_size
    tokens_per_step = accum * B * T
    flops_peak = peak_flops(device)

    def to_device(x, y):
        if device.type == "cuda":  # pinned memory lets the copy overlap with compute
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)

    def batch(step, micro):
        """This rank's micro-batch `micro` of the global batch of `step`."""
        starts = batch_starts(cfg["seed"], TRAIN_STREAM, step, accum * B, len(train_data), T)
        first = (rank * local_accum + micro) * B
        return to_device(*get_batch(train_data, starts[first:first + B], T))

    @torch.no_grad()
    def estimate_loss():
        """Mean loss over the same eval_iters batches every time; eval mode, so no dropout and no RNG used."""
        fast_model.eval()
        out = {}
        for split, data in (("train", train_data), ("val", val_data)):
            losses = torch.zeros(cfg["eval_iters"])
            for k in range(cfg["eval_iters"]):
                starts = batch_starts(cfg["seed"], EVAL_STREAM, k, B, len(data), T)
                x, y = to_device(*get_batch(data, starts, T))
                with autocast:
                    _, loss = fast_model(x, y)
                losses[k] = loss.item()
            out[split] = losses.mean().item()
        fast_model.train()
        return out

    # SIGTERM and SIGUSR1 (what schedulers and spot instances send before taking the machine) finish the current
    # step, save it, and exit cleanly; under DDP the ranks agree on the step through a CPU all-reduce that runs
    # while the step computes, so it costs no GPU sync
    stop_signal = []
    default_handlers = {sig: signal.signal(sig, lambda signum, frame: stop_signal.append(signum))
                        for sig in (signal.SIGTERM, signal.SIGUSR1)}
    stop_flag = torch.zeros(1, dtype=torch.int32)
    stop_group = dist.new_group(backend="gloo") if ddp else None

    # checkpoints: the loop waits for a host snapshot; with async_checkpoint, a thread writes it out
    saver = ThreadPoolExecutor(max_workers=1) if cfg["async_checkpoint"] and master else None
    saving, snapshot_buffers = None, {}

    def report_save(result):
        path, pruned = result
        log(f"saved {path}" + (f"; deleted steps {', '.join(map(str, pruned))}" if pruned else ""))

    step = start_step
    log(f"{raw_model.get_num_params() / 1e6:.2f}M parameters; {tokens_per_step:,} tokens per step "
        f"({accum} x {B} x {T}, {world_size} rank{'s' if world_size > 1 else ''}); training to step {cfg['max_iters']}")
    x, y = batch(step, 0)
    t0, steps_timed = time.time(), 0  # ms/step counts training alone, not evals or saves
    while step < cfg["max_iters"]:
        if ddp:
            stop_flag.fill_(1 if stop_signal else 0)
            stop_vote = dist.all_reduce(stop_flag, op=dist.ReduceOp.MAX, group=stop_group, async_op=True)
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

        if ddp:
            stop_vote.wait()
        stop = bool(stop_flag.item()) if ddp else bool(stop_signal)
        last = step == cfg["max_iters"]
        do_log = step % cfg["log_interval"] == 0 or last or stop
        do_eval = master and (step % cfg["eval_interval"] == 0 or last)
        do_save = master and (step % cfg["checkpoint_interval"] == 0 or last or stop)
        if do_log:
            loss_now = loss.item() * local_accum  # the one host-device sync of the loop; a micro-batch's loss
            dt = (time.time() - t0) / steps_timed
            mfu = f"{raw_model.estimate_mfu(tokens_per_step / dt, flops_peak * world_size) * 100:.1f}%" if flops_peak else "n/a"
            log(f"step {step}: loss {loss_now:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms/step, "
                f"{tokens_per_step / dt:,.0f} tokens/s, mfu {mfu}")
        losses = {}
        if do_eval:
            losses = estimate_loss()
            best_val_loss = min(best_val_loss, losses["val"])
            log(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        if do_save:
            if saving is not None:
                saving = report_save(saving.result())  # at most one save in flight; its error, if any, stops the run
            snap = checkpoint.snapshot({
                "model": raw_model.state_dict(),  # clean names: neither DDP's module. nor compile's _orig_mod.
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "step": step,
                "config": cfg,
                "model_args": model_args,
                "meta": meta,  # the vocabulary, so sample.py needs nothing but the checkpoint
                # dropout is seeded from (seed, step, micro-step): config's seed is all its randomness needs
                "best_val_loss": best_val_loss,
                "tokens_seen": tokens_seen,
                "train_loss": losses.get("train"),
                "val_loss": losses.get("val"),
                "written_at": time.time(),
            }, snapshot_buffers)
            job = (cfg["out_dir"], step, snap, cfg["keep_last_checkpoints"], cfg["keep_every"], [start_step])
            if saver:
                saving = saver.submit(checkpoint.publish, *job)
            else:
                report_save(checkpoint.publish(*job))
        elif saving is not None and saving.done():
            saving = report_save(saving.result())  # raises here, at the next step, if the background save failed
        if do_log or do_eval or do_save:
            t0, steps_timed = time.time(), 0
        if stop:
            log(f"stopped by a signal after step {step}; rerun the same command to resume")
            break
    if saving is not None:
        report_save(saving.result())  # the last checkpoint is on disk before the process exits
    if saver:
        saver.shutdown()
    for sig, handler in default_handlers.items():  # main() may run again in this process, as the tests do
        signal.signal(sig, handler)
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ConfigError, checkpoint.CheckpointError) as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
