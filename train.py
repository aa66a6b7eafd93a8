"""
Train a GPT on one process or many. With no flags it trains a small character-level model on a CPU:

    python train.py
    python train.py config/train_shakespeare_char.py --from_checkpoint_step=2000
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py

This is the file to fork: the config, the learning-rate schedule, the model and optimizer set-up, and the
training loop, top to bottom. A resumed run computes exactly what an unbroken one would. What keeps that promise
is outside this file, in three places a fork rarely touches: dataset.py (every batch and dropout mask is a pure
function of the seed and the step), outdir.py (the run's checkpoints and its life in out_dir: start or resume,
log, save, stop, finish), and model.py's clip_grad_norm (the same gradient norm in every layout).
A change here (a schedule, an optimizer, the model) keeps every promise; a checkpoint the changed code cannot
load is refused in one line that says what differs.
"""
import math
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
import outdir
from configurator import ConfigError, check_ranges, parse
from dataset import EVAL_STREAM, TRAIN_STREAM, batch_starts, get_batch, load_dataset, micro_seed, model_vocab_size
from device import check_device, peak_flops, setup_runtime
from model import GPT, SHAPE_KEYS, GPTConfig, clip_grad_norm
from stops import run_main

CONFIG = [  # (key, default, what it sets); `python train.py --help` prints this table
    # ---- the run: where it lives, where it starts ----
    ("out_dir", "out", "folder for ckpt_<step>.pt files"),
    ("from_checkpoint_step", -1, "-1: resume the newest checkpoint; N: step N; 0: start fresh"),
    ("init_from", "scratch", "a fresh start's weights: scratch, gpt2*, a checkpoint or out_dir"),
    ("eval_only", False, "evaluate the checkpoint a resume would pick, print the losses, exit"),
    # ---- checkpoints ----
    ("checkpoint_interval", 250, "save a checkpoint every this many steps, and at the last step"),
    ("async_checkpoint", True, "write checkpoints in the background; the loop waits for a copy"),
    ("keep_last_checkpoints", 3, "keep the newest this many checkpoints; 0 keeps all"),
    ("keep_every", 0, "also keep, for good, the steps divisible by this; 0: none"),
    ("keep_best", True, "also keep the checkpoint with the best val loss"),
    ("always_save_checkpoint", True, "nanoGPT's key; False: also save when val loss is a new best"),
    # ---- evaluation and logging ----
    ("eval_interval", 250, "estimate train/val loss every this many steps, and at the last step"),
    ("eval_iters", 20, "batches per loss estimate"),
    ("log_interval", 10, "print, and add to metrics.jsonl, loss, lr, speed every this many steps"),
    ("wandb_log", False, "also log to Weights & Biases; a resume continues the same wandb run"),
    ("wandb_project", "gpt-resume", "wandb project"),
    ("wandb_run_name", "run", "wandb run name"),
    # ---- data ----
    ("dataset", "python_char", "a folder under data/, or a path to one"),
    ("batch_size", 16, "sequences per micro-batch on each rank"),
    ("block_size", 64, "context length in tokens"),
    ("gradient_accumulation_steps", 0, "micro-batches per step, all ranks together; 0: one a rank"),
    # ---- model ----
    ("n_layer", 4, "transformer blocks"),
    ("n_head", 4, "attention heads per block"),
    ("n_embd", 128, "embedding width; a multiple of n_head"),
    ("dropout", 0.0, "dropout probability; 0.0 for pretraining, 0.1+ for finetuning"),
    ("bias", False, "biases in Linear and LayerNorm layers, as GPT-2 has"),
    ("vocab_size", None, "None: meta.json's; GPT-2 runs pad 50257 to 50304 (64 x 786) for speed"),
    # ---- AdamW, and the learning-rate schedule ----
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
    # ---- the machine ----
    ("device", "auto", "auto (cuda when available, else cpu), cpu, cuda, cuda:N or mps"),
    ("dtype", "auto", "auto (GPU: bfloat16, or float16 with loss scaling; CPU: float32), or one"),
    ("deterministic", False, "deterministic GPU kernels: a resumed GPU run is bit-exact; slower"),
    ("compile", None, "torch.compile the model; None: on for CUDA only"),
    ("backend", "auto", "nanoGPT's key, ignored: gradients go over NCCL on CUDA, else gloo"),
    ("fsdp", False, "under torchrun, shard weights, gradients and AdamW state over the ranks"),
    ("seed", 1337, "seeds the initial weights, the batches and dropout"),
]
# The loop's own state besides the model and optimizer, saved in every checkpoint and restored at a resume (a key
# an older checkpoint lacks resumes at its default). There is no RNG state: the seed and the step determine every
# batch and every dropout mask.
LOOP_STATE = {
    "best_val_loss": float("inf"),  # the lowest val loss evaluated so far
    "tokens_seen": 0,  # tokens trained on, all ranks together
}


def check_config(cfg, world_size, local_rank):
    """Reject bad values and combinations before anything is started or written."""
    check_ranges(cfg,
                 positive=("batch_size", "block_size", "gradient_accumulation_steps", "n_layer", "n_head", "n_embd",
                           "max_iters", "eval_iters", "eval_interval", "log_interval", "checkpoint_interval"),
                 not_negative=("learning_rate", "min_lr", "weight_decay", "grad_clip", "warmup_iters",
                               "lr_decay_iters", "keep_last_checkpoints", "keep_every"),
                 below_one=("dropout", "beta1", "beta2"))
    if cfg["n_embd"] % cfg["n_head"]:
        raise ConfigError(f"n_embd={cfg['n_embd']} must be divisible by n_head={cfg['n_head']}")
    # get_lr's cosine runs from warmup_iters to lr_decay_iters: a negative stretch would divide by a negative
    if cfg["warmup_iters"] > cfg["lr_decay_iters"]:
        raise ConfigError(f"warmup_iters={cfg['warmup_iters']} must not exceed lr_decay_iters={cfg['lr_decay_iters']}")
    if not 0 <= cfg["seed"] < 2 ** 63:  # numpy's and torch's generators both take it
        raise ConfigError(f"seed must be in [0, 2**63), got {cfg['seed']}")
    # the global batch is split into micro-batches over the ranks: each rank must get a whole number of them
    if cfg["gradient_accumulation_steps"] % world_size:
        raise ConfigError(f"gradient_accumulation_steps={cfg['gradient_accumulation_steps']} must be divisible by "
                          f"the number of ranks, {world_size}: pass a multiple")
    vocab_size = cfg["vocab_size"]  # None: the dataset's; a default of None takes any literal, so check it here
    if not (vocab_size is None or type(vocab_size) is int and vocab_size > 0):
        raise ConfigError(f"vocab_size must be None or a positive int, got {vocab_size!r}")
    if cfg["compile"] is not None and not isinstance(cfg["compile"], bool):  # 1 == True, yet no bool
        raise ConfigError(f"compile must be None, True or False, got {cfg['compile']!r}")
    check_device(cfg["device"], cfg["dtype"], local_rank)


def get_lr(step, cfg):
    """The learning rate of the update from `step` to step+1: linear warmup, then cosine decay to min_lr.
    A fork's own schedule goes here: a resume's "no effect" notes ask this function, whatever it computes."""
    if not cfg["decay_lr"]:
        return cfg["learning_rate"]
    # 1) linear warmup for warmup_iters steps
    if step < cfg["warmup_iters"]:
        return cfg["learning_rate"] * (step + 1) / (cfg["warmup_iters"] + 1)
    # 2) past lr_decay_iters, min_lr
    if step >= cfg["lr_decay_iters"]:
        return cfg["min_lr"]
    # 3) in between, cosine decay from learning_rate down to min_lr
    decay_ratio = (step - cfg["warmup_iters"]) / (cfg["lr_decay_iters"] - cfg["warmup_iters"])
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # from 1 down to 0
    return cfg["min_lr"] + coeff * (cfg["learning_rate"] - cfg["min_lr"])


def set_hyperparameters(optimizer, cfg, lr):
    """Every step, set each optimizer group's hyperparameters from the config, by the group's name: a resume
    loads the groups as they were saved, so a changed --beta2 or --weight_decay acts from the first step resumed.
    Only what a group holds is set: another optimizer's groups (SGD's have no betas) get only their own keys."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        if "betas" in group:
            group["betas"] = (cfg["beta1"], cfg["beta2"])
        if "weight_decay" in group:
            # matrices and embeddings decay; biases and LayerNorm gains do not (model.configure_optimizers)
            group["weight_decay"] = cfg["weight_decay"] if group["name"] == "decay" else 0.0


def build_model(cfg, model_args, device, dtype, weights, weights_from, shard_group):
    """The model and its optimizer, and float16's loss scaler: fresh from the seed, then given `weights` (a
    checkpoint's or init_from's, checked to fit) if any; sharded over shard_group's ranks if it is not None."""
    # the initial weights come from the seed alone: every rank, and every fresh start, makes the same model
    torch.manual_seed(cfg["seed"])
    model = GPT(GPTConfig(**model_args))
    if weights:
        outdir.load_weights(model, weights, weights_from)
    model.to(device)  # loaded on the CPU first: a checkpoint's tensors are there, and a GPU holds one copy only
    if shard_group is not None:  # FSDP2: each rank keeps 1/N of the weights, of their gradients, of AdamW's state
        import sharded  # only a sharded run pays the seconds its modules take to import
        sharded.shard(model, shard_group, device.type, dtype)
    optimizer = model.configure_optimizers(cfg["weight_decay"], cfg["learning_rate"], (cfg["beta1"], cfg["beta2"]),
                                           device.type)
    # float16's small range needs the loss scaled up, and the scale moved each step; the others need nothing
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "float16")
    return model, optimizer, scaler


@torch.no_grad()
def estimate_loss(model, splits, cfg, device, autocast, sharded_ranks):
    """The mean loss of each split over the same eval_iters batches every time, in eval mode (no dropout)."""
    model.eval()  # no dropout: the estimate depends on the weights alone
    out = {}
    for split, data in splits.items():
        losses = torch.zeros(cfg["eval_iters"])
        for k in range(cfg["eval_iters"]):
            # EVAL_STREAM: the same batches at every evaluation, so that two estimates compare the weights alone
            starts = batch_starts(cfg["seed"], EVAL_STREAM, k, cfg["batch_size"], len(data), cfg["block_size"])
            with autocast:
                _, loss = model(*get_batch(data, starts, cfg["block_size"], device))
            losses[k] = loss.item()  # a host sync per batch: evaluation is rare, and this keeps it simple
        if sharded_ranks:  # every rank computed them; rank 0's decide for all, to the last bit
            dist.broadcast(losses, src=0)
        out[split] = losses.mean().item()
    model.train()  # back to training mode: dropout on again
    return out


def main(argv):
    cfg, given = parse(CONFIG, argv)  # given: the keys this command set, in a config file or a flag
    # whatever ends the run, an error or Ctrl-C too, undoes its set-up on the way out
    with outdir.Run(cfg, given) as run:
        train(cfg, given, run)


def train(cfg, given, run):
    # ---- ranks: one process, or torchrun's (outdir.Run has joined the job) ----
    if run.ddp:
        rank = dist.get_rank()
        world_size = dist.get_world_size()
        local_rank = int(os.environ["LOCAL_RANK"])  # this rank's GPU on its machine
    else:
        rank = 0
        world_size = 1
        local_rank = None
    master = rank == 0  # rank 0 prints, and writes out_dir
    log = print if master else (lambda *args: None)

    # ---- where the run starts: rank 0 chooses the checkpoint, every rank resumes it ----
    resumed = run.resume()  # the checkpoint's state, its config merged into cfg; None: a fresh start
    start_step = resumed["step"] if resumed else 0
    # 0 means one micro-batch a rank, fixed at the start: a resume on other ranks keeps the global batch
    if cfg["gradient_accumulation_steps"] == 0:
        cfg["gradient_accumulation_steps"] = world_size
    # checked after the resume's merge: an inherited value is checked as a given one is
    check_config(cfg, world_size, local_rank)
    init = run.init_weights()  # a fresh start's weights, from init_from; None: from the seed
    loop = {}  # the loop's own state: resumed from the checkpoint, or LOOP_STATE's defaults
    for key, default in LOOP_STATE.items():
        loop[key] = resumed.get(key, default) if resumed else default

    # ---- data, and the machine ----
    trained_on = (resumed["step"], resumed.get("data")) if resumed else None  # a resume on other data is refused
    meta, train_data, val_data, data_id = load_dataset(cfg["dataset"], cfg["block_size"], trained_on)
    vocab_size = model_vocab_size(cfg, meta, init["vocab"] if init else None, log)
    device, dtype, autocast = setup_runtime(cfg["device"], cfg["dtype"], cfg["deterministic"], local_rank)

    # ---- the model and the optimizer ----
    # what shapes the weights, saved with them: a resume or init_from rebuilds the same model from it
    model_args = {key: cfg[key] for key in SHAPE_KEYS}
    model_args["vocab_size"] = vocab_size
    model_args["dropout"] = cfg["dropout"]
    # CUDA's gradients go over NCCL; gloo, the default group, carries everything else (and all of it on a CPU)
    grad_group = None
    if run.ddp and device.type == "cuda":
        grad_group = dist.new_group(backend="nccl")
    shard_group = None
    if run.sharded:
        shard_group = grad_group or dist.group.WORLD
    weights = None
    weights_from = None
    if init:
        weights = init["weights"]
        weights_from = cfg["init_from"]
    elif resumed:
        weights = resumed["model"]  # empty for a sharded folder: load_optimizer reads its shards
        weights_from = "resume"
    raw_model, optimizer, scaler = build_model(cfg, model_args, device, dtype, weights, weights_from, shard_group)
    if resumed:
        outdir.load_optimizer(raw_model, optimizer, scaler, resumed)
    log(run.start_line(get_lr))
    # the host copies of the checkpoint are loaded into the model now: let them go
    del resumed, init, weights
    use_compile = cfg["compile"] if cfg["compile"] is not None else device.type == "cuda"
    model = raw_model  # what computes: compiled, perhaps; raw_model is what a checkpoint saves, with clean names
    if use_compile:
        model = torch.compile(raw_model)
    train_model = model  # what trains: under DDP, wrapped so that the ranks average their gradients
    if run.ddp and not run.sharded:
        device_ids = [device.index] if device.type == "cuda" else None
        train_model = DDP(model, device_ids=device_ids, process_group=grad_group)
    splits = {"train": train_data, "val": val_data}  # what estimate_loss measures

    if cfg["eval_only"]:
        losses = estimate_loss(model, splits, cfg, device, autocast, run.sharded)
        log(f"step {start_step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f} "
            f"(eval_only: nothing written)")
        return
    if start_step >= cfg["max_iters"]:  # a finished run resumed: say so rather than save the same step again
        log(f"nothing to train: step {start_step} has reached max_iters={cfg['max_iters']}; raise --max_iters to "
            f"train further")
        return
    log(config_line(cfg, given, world_size, meta["vocab_size"], device, dtype))

    # ---- every check has passed: only now is anything written ----
    cfg["vocab_size"] = vocab_size  # resolved, as a checkpoint's config should say: scripts read it there
    run.open()

    # ---- the training loop ----
    B = cfg["batch_size"]
    T = cfg["block_size"]
    accum = cfg["gradient_accumulation_steps"]  # micro-batches per step, all ranks together
    local_accum = accum // world_size  # this rank's: the ranks split the global batch between them
    tokens_per_step = accum * B * T
    peak = peak_flops(device)  # the GPU's peak FLOP/s, for MFU; None on a CPU

    def batch(step, micro):
        """This rank's micro-batch `micro` of the global batch of `step`: the same on any number of ranks."""
        starts = batch_starts(cfg["seed"], TRAIN_STREAM, step, accum * B, len(train_data), T)
        first = (rank * local_accum + micro) * B
        return get_batch(train_data, starts[first:first + B], T, device)

    compiling = "; compiling the model first (a minute for GPT-2 124M on a GPU)" if use_compile else ""
    log(f"{raw_model.get_num_params() / 1e6:.2f}M parameters; {tokens_per_step:,} tokens per step ({accum} x {B} x "
        f"{T}, {world_size} rank{'s' if world_size > 1 else ''}); training to step {cfg['max_iters']}{compiling}")
    step = start_step  # the number of optimizer steps taken: a checkpoint of step N holds the state after N of them
    x, y = batch(step, 0)  # the first micro-batch; each next one is fetched while the GPU computes this one
    t0 = time.perf_counter()
    steps_timed = 0  # steps since t0: ms/step measures training alone, never an evaluation or a save
    while step < cfg["max_iters"]:
        # the learning rate of this step, in every optimizer group
        lr = get_lr(step, cfg)
        set_hyperparameters(optimizer, cfg, lr)

        # forward and backward over this rank's micro-batches, the gradients adding up
        for micro in range(local_accum):
            last_micro = micro == local_accum - 1
            # the ranks average their gradients once, after the last micro-batch, not after every one
            if run.sharded:
                raw_model.set_requires_gradient_sync(last_micro)
            elif run.ddp:
                train_model.require_backward_grad_sync = last_micro
            # dropout masks depend on (seed, step, micro-batch) alone: the same on any rank, in any resume
            torch.manual_seed(micro_seed(cfg["seed"], step, rank * local_accum + micro))
            with autocast:
                _, loss = train_model(x, y)
                loss = loss / local_accum  # the mean over micro-batches; DDP averages over the ranks
            # fetch the next micro-batch while the GPU works on this one
            if last_micro:
                x, y = batch(step + 1, 0)
            else:
                x, y = batch(step, micro + 1)
            scaler.scale(loss).backward()
        if cfg["grad_clip"] > 0.0:
            scaler.unscale_(optimizer)  # clip the true gradients, not float16's scaled ones
            clip_grad_norm(raw_model.parameters(), cfg["grad_clip"])
        scaler.step(optimizer)  # skipped when float16's gradients overflowed
        scaler.update()
        optimizer.zero_grad(set_to_none=True)  # set_to_none frees the gradients' memory until the next backward
        step += 1
        steps_timed += 1
        loop["tokens_seen"] += tokens_per_step

        # ---- after the step: should we stop, then log, evaluate, save ----
        stop = run.should_stop(step)  # a signal on any rank: every rank stops after this same step
        last = step == cfg["max_iters"]  # the last step is always logged, evaluated and saved
        evaluates = (master or run.sharded) and (step % cfg["eval_interval"] == 0 or last)
        timed = step % cfg["log_interval"] == 0 or last  # a full interval of steps to measure
        if timed or stop:
            loss_now = loss.item() * local_accum  # the loop's one host-device sync: the last micro-batch's loss
            if timed:
                dt = (time.perf_counter() - t0) / steps_timed  # seconds a step
                mfu = raw_model.estimate_mfu(tokens_per_step / dt, peak * world_size) if peak else None
                mfu_text = f", mfu {mfu:.1%}" if mfu else ""
                log(f"step {step}: loss {loss_now:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms/step, "
                    f"{tokens_per_step / dt:,.0f} tokens/s{mfu_text}, {run.time_left(step, dt)} to go")
                run.log(step, loss=loss_now, lr=lr, ms_per_step=dt * 1000, tokens_per_s=tokens_per_step / dt,
                        tokens=loop["tokens_seen"], mfu=mfu)
            else:  # stopping part-way through an interval, whose pace would mislead
                log(f"step {step}: loss {loss_now:.4f}, lr {lr:.2e}")
                run.log(step, loss=loss_now, lr=lr, tokens=loop["tokens_seen"])
        losses = {}  # this step's train and val loss, if it evaluates: saved in its checkpoint
        improved = False
        if evaluates:
            with run.timed("eval", step):  # said first when it will take long
                losses = estimate_loss(model, splits, cfg, device, autocast, run.sharded)
            improved = losses["val"] < loop["best_val_loss"]  # for always_save_checkpoint=False, below
            loop["best_val_loss"] = min(loop["best_val_loss"], losses["val"])
            log(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            run.log(step, train_loss=losses["train"], val_loss=losses["val"])
        # nanoGPT's always_save_checkpoint=False: save where the val loss is the best yet, besides the interval
        saves = (master or run.sharded) and (step % cfg["checkpoint_interval"] == 0 or last or stop
                                             or (improved and not cfg["always_save_checkpoint"]))
        if saves:
            run.save({
                "model": raw_model.state_dict(),  # clean names: no DDP module., no compile _orig_mod.
                "optimizer": optimizer.state_dict(),
                "optimizer_class": type(optimizer).__name__,  # a resume by code with another optimizer says so
                "scaler": scaler.state_dict(),
                "step": step,
                "config": cfg,  # as given: a resume on another machine resolves device and dtype anew
                "model_args": model_args,
                "meta": meta,  # the vocabulary, so that sample.py needs nothing but the checkpoint
                "data": data_id,  # the dataset's fingerprint: a resume on other data is refused
                "train_loss": losses.get("train"),
                "val_loss": losses.get("val"),
                "written_at": time.time(),
                **loop,
            })
        # the next interval's clock starts after this step's logging, evaluation and save
        if timed or evaluates or saves:
            t0 = time.perf_counter()
            steps_timed = 0
        if stop:  # saved above: the run ends, exit 0, and the same command resumes it
            break
    run.finish(step)  # waits for the last checkpoint to be on disk


def config_line(cfg, given, world_size, data_vocab_size, device, dtype):
    """The keys whose value is not their default, and where the run computes. A default that means 'work it
    out' (0 micro-batches: one a rank; vocab_size None: the dataset's) is no change when worked out."""
    defaults = {key: default for key, default, _ in CONFIG}
    worked_out = {"gradient_accumulation_steps": world_size, "vocab_size": data_vocab_size}
    changed = []
    for key in defaults:
        if cfg[key] == defaults[key]:
            continue
        if key not in given and worked_out.get(key) == cfg[key]:
            continue
        if key == "backend":
            changed.append(f"{key}={cfg[key]!r} (nanoGPT's key: changes nothing here)")
        elif key == "fsdp" and world_size == 1:
            changed.append(f"{key}={cfg[key]!r} (one process: nothing to shard, it trains unsharded)")
        else:
            changed.append(f"{key}={cfg[key]!r}")
    line = f"config beyond defaults: {', '.join(changed) or 'none'} (device {device}, dtype {dtype})"
    if device.type == "cpu" and dtype != "float32":
        line += "; autocast on a CPU: often slower"
    return line


if __name__ == "__main__":
    run_main(main, (checkpoint.CheckpointError,),
             interrupted="interrupted: stopped at once, without saving the current step; "
                         "rerun the same command to resume")
