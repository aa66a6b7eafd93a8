"""
Train a GPT on one process or many. With no flags it trains a small character-level model on a CPU:

    python train.py
    python train.py config/train_shakespeare_char.py --from_checkpoint_step=2000
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py

The file to fork: config, LR schedule, model and optimizer set-up, the loop. A resumed run computes
what an unbroken one would; what keeps that promise is in dataset.py, outdir.py, checkpoint.py.
"""
import math
import os
import time
from contextlib import ExitStack

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
import outdir
import sharded
from configurator import ConfigError, check_ranges, parse, run_main
from dataset import (EVAL_STREAM, TRAIN_STREAM, batch_starts, get_batch, load_dataset, micro_seed,
                     model_vocab_size)
from device import check_device, join_job, peak_flops, setup_runtime
from logs import Metrics, Pace
from model import GPT, GPTConfig
from saver import Saver

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
# A run's state besides model and optimizer, saved and restored (an older checkpoint's missing key
# resumes its default); origin names the weights step 0 started from
LOOP_STATE = {"best_val_loss": float("inf"), "tokens_seen": 0, "best_checkpoint": None,
              "origin": "scratch", "wandb_run_id": None}


def check_config(cfg, world_size, local_rank):
    """Reject bad values and combinations before anything is started or written."""
    check_ranges(cfg, positive=("batch_size", "block_size", "gradient_accumulation_steps",
                                "n_layer", "n_head", "n_embd", "max_iters", "eval_iters",
                                "eval_interval", "log_interval", "checkpoint_interval"),
                 not_negative=("learning_rate", "min_lr", "weight_decay", "grad_clip",
                               "warmup_iters", "lr_decay_iters", "keep_last_checkpoints",
                               "keep_every"), below_one=("dropout", "beta1", "beta2"))
    if cfg["n_embd"] % cfg["n_head"]:
        raise ConfigError(f"n_embd={cfg['n_embd']} must be divisible by n_head={cfg['n_head']}")
    if cfg["warmup_iters"] > cfg["lr_decay_iters"]:
        raise ConfigError(f"warmup_iters={cfg['warmup_iters']} must not exceed "
                          f"lr_decay_iters={cfg['lr_decay_iters']}")
    if not 0 <= cfg["seed"] < 2 ** 63:  # numpy's and torch's generators both take it
        raise ConfigError(f"seed must be in [0, 2**63), got {cfg['seed']}")
    if cfg["gradient_accumulation_steps"] % world_size:
        raise ConfigError(f"gradient_accumulation_steps={cfg['gradient_accumulation_steps']} must "
                          f"be divisible by the number of ranks, {world_size}: pass a multiple")
    if not (cfg["vocab_size"] is None or type(cfg["vocab_size"]) is int and cfg["vocab_size"] > 0):
        raise ConfigError(f"vocab_size must be None or a positive int, got {cfg['vocab_size']!r}")
    if not (cfg["compile"] is None or isinstance(cfg["compile"], bool)):
        raise ConfigError(f"compile must be None, True or False, got {cfg['compile']!r}")
    check_device(cfg["device"], cfg["dtype"], local_rank)


def get_lr(step, cfg):
    """Learning rate of the update from `step` to step+1: linear warmup, cosine decay to min_lr."""
    if not cfg["decay_lr"]:
        return cfg["learning_rate"]
    if step < cfg["warmup_iters"]:
        return cfg["learning_rate"] * (step + 1) / (cfg["warmup_iters"] + 1)
    if step >= cfg["lr_decay_iters"]:
        return cfg["min_lr"]
    ratio = (step - cfg["warmup_iters"]) / (cfg["lr_decay_iters"] - cfg["warmup_iters"])
    lr, min_lr = cfg["learning_rate"], cfg["min_lr"]
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def set_hyperparameters(optimizer, cfg, lr):
    """Each group's lr, betas, weight decay, by its name, each step (a resume loads old ones)."""
    for group in optimizer.param_groups:
        decay = cfg["weight_decay"] if group["name"] == "decay" else 0.0
        group.update(lr=lr, betas=(cfg["beta1"], cfg["beta2"]), weight_decay=decay)


def build_model(cfg, model_args, device, dtype, init, state, shard_group):
    """The model, AdamW and float16's loss scaler: fresh from the seed, with init_from's weights,
    or as the checkpoint left them; sharded over shard_group's ranks if any."""
    torch.manual_seed(cfg["seed"])
    model = GPT(GPTConfig(**model_args))
    weights = init["weights"] if init else state and state["model"]  # a folder's come in load()
    if weights:
        model.load_state_dict(weights)
    model.to(device)
    if shard_group is not None:  # FSDP2: each rank keeps 1/N of the weights, and of all made after
        sharded.shard(model, shard_group, device.type, dtype)
    optimizer = model.configure_optimizers(cfg["weight_decay"], cfg["learning_rate"],
                                           (cfg["beta1"], cfg["beta2"]), device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "float16")
    if state is not None:
        if shard_group is not None:  # each rank reads its shards: of the folder, or of the whole
            sharded.load(model, optimizer, state)
        else:
            optimizer.load_state_dict(state["optimizer"])
        if scaler.is_enabled() and state.get("scaler"):  # a switch to float16 starts a new scale
            scaler.load_state_dict(state["scaler"])
    return model, optimizer, scaler


@torch.no_grad()
def estimate_loss(model, splits, cfg, device, autocast, sharded_ranks=False):
    """Mean loss of each split over the same eval_iters batches each time; eval mode: no dropout."""
    model.eval()
    out = {}
    for split, data in splits.items():
        losses = torch.zeros(cfg["eval_iters"])
        for k in range(cfg["eval_iters"]):
            starts = batch_starts(cfg["seed"], EVAL_STREAM, k, cfg["batch_size"], len(data),
                                  cfg["block_size"])
            with autocast:
                _, loss = model(*get_batch(data, starts, cfg["block_size"], device))
            losses[k] = loss.item()
        if sharded_ranks:  # every rank computed them: rank 0's decide for all, to the last bit
            dist.broadcast(losses, src=0)
        out[split] = losses.mean().item()
    model.train()
    return out


def main(argv):
    with ExitStack() as cleanup:  # whatever ends the run, an error or Ctrl-C too, undoes its set-up
        run(argv, cleanup)


def run(argv, cleanup):
    # ---- config and ranks ----
    cfg, given = parse(CONFIG, argv)
    ddp = "RANK" in os.environ
    rank, world_size = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    local_rank = int(os.environ["LOCAL_RANK"]) if ddp else None
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    outdir.check_out_dir(cfg)
    # from here on a signal asks the run to stop after its first step: start-up is never cut short
    stops = cleanup.enter_context(outdir.StopSignals(ddp, cfg))
    if ddp:  # gloo carries control messages (CUDA gradients: NCCL, below); a store prefix per start
        cleanup.enter_context(join_job())

    # ---- which step to start from: rank 0 chooses, every rank resumes it ----
    start_step, state, locked = outdir.resolve_start(cfg, given, ddp, master, cleanup)
    # 0: one micro-batch a rank, fixed at the start (a resume on other ranks keeps the global batch)
    cfg["gradient_accumulation_steps"] = cfg["gradient_accumulation_steps"] or world_size
    check_config(cfg, world_size, local_rank)
    init = outdir.init_weights(cfg, given) if state is None else None  # None: init_from=scratch
    loop = {key: (state or {}).get(key, default) for key, default in LOOP_STATE.items()}
    loop["origin"] = init["origin"] if init else loop["origin"]

    # ---- data, and the machine ----
    meta, train_data, val_data, data_id = load_dataset(
        cfg["dataset"], cfg["block_size"], trained_on=state and (state["step"], state.get("data")))
    vocab_size = model_vocab_size(cfg, meta, init and init["vocab"], log)
    device, dtype, autocast = setup_runtime(cfg["device"], cfg["dtype"], cfg["deterministic"],
                                            local_rank)
    shards = ddp and cfg["fsdp"]  # on one process fsdp changes nothing: there is nothing to shard

    # ---- model and optimizer ----
    model_args = {k: cfg[k] for k in outdir.SHAPE_KEYS} | {"vocab_size": vocab_size,
                                                          "dropout": cfg["dropout"]}
    grad_group = dist.new_group(backend="nccl") if ddp and device.type == "cuda" else None
    raw_model, optimizer, scaler = build_model(cfg, model_args, device, dtype, init, state,
                                               (grad_group or dist.group.WORLD) if shards else None)
    state = init = log(outdir.start_line(cfg, given, start_step, state, init))  # frees host copies
    use_compile = device.type == "cuda" if cfg["compile"] is None else cfg["compile"]
    model = fast_model = torch.compile(raw_model) if use_compile else raw_model
    if ddp and not shards:
        model = DDP(fast_model, device_ids=[device.index] if device.type == "cuda" else None,
                    process_group=grad_group)
    splits = {"train": train_data, "val": val_data}
    if cfg["eval_only"]:
        losses = estimate_loss(fast_model, splits, cfg, device, autocast, shards)
        return log(f"step {start_step}: train loss {losses['train']:.4f}, val loss "
                   f"{losses['val']:.4f} (eval_only: nothing written)")
    if start_step >= cfg["max_iters"]:
        return log(f"nothing to train: step {start_step} has reached max_iters={cfg['max_iters']}; "
                   f"raise --max_iters to train further")
    differs = [f"{k}={cfg[k]!r}" + " (nanoGPT's key: changes nothing here)" * (k == "backend")
               for k, default, _ in CONFIG if cfg[k] != default]
    log(f"config beyond defaults: {', '.join(differs) or 'none'} (device {device}, dtype {dtype})"
        + ("; autocast on a CPU: often slower" * (device.type == "cpu" and dtype != "float32")))

    # ---- every check has passed: only now is anything written ----
    metrics, guard = (outdir.open_out_dir(cfg, start_step, locked, loop, cleanup, log) if master
                      else (Metrics(), None))  # rank 0 alone writes metrics.jsonl, wandb, ckpts
    # whatever ends the run waits for the save in flight (entered last, so it is left first)
    saves = cleanup.enter_context(Saver(cfg["out_dir"], cfg["keep_last_checkpoints"],
                                        cfg["keep_every"], not cfg["async_checkpoint"], guard, log,
                                        shards, master))

    # ---- the loop ----
    B, T, accum = cfg["batch_size"], cfg["block_size"], cfg["gradient_accumulation_steps"]
    local_accum = accum // world_size  # this rank's micro-steps: the ranks split the global batch
    tokens_per_step = accum * B * T
    peak = peak_flops(device)  # the GPU's FLOP/s for MFU; None on a CPU: MFU n/a

    def batch(step, micro):  # this rank's micro-batch `micro` of the global batch of `step`
        starts = batch_starts(cfg["seed"], TRAIN_STREAM, step, accum * B, len(train_data), T)
        first = (rank * local_accum + micro) * B
        return get_batch(train_data, starts[first:first + B], T, device)

    step = start_step
    log(f"{raw_model.get_num_params() / 1e6:.2f}M parameters; {tokens_per_step:,} tokens per step "
        f"({accum} x {B} x {T}, {world_size} rank{'s' if world_size > 1 else ''}); "
        f"training to step {cfg['max_iters']}"
        + ("; compiling the model first (a minute for GPT-2 124M on a GPU)" if use_compile else ""))
    metrics.record(step, event="resume" if start_step else "start")
    x, y = batch(step, 0)
    t0, steps_timed, pace = time.perf_counter(), 0, Pace(cfg, local_accum, log)  # ms/step: training
    while step < cfg["max_iters"]:
        stops.vote()  # the ranks vote on stopping while this step computes; read after the step
        lr = get_lr(step, cfg)
        set_hyperparameters(optimizer, cfg, lr)
        for micro in range(local_accum):
            if shards:  # reduce the gradients once, on the last micro-step: as DDP does
                raw_model.set_requires_gradient_sync(micro == local_accum - 1)
            elif ddp:
                model.require_backward_grad_sync = micro == local_accum - 1
            # dropout masks depend on (seed, step, micro-step) alone: the same on any rank or resume
            torch.manual_seed(micro_seed(cfg["seed"], step, rank * local_accum + micro))
            with autocast:
                _, loss = model(x, y)
                loss = loss / local_accum  # DDP averages over ranks; this averages over micro-steps
            # fetch the next micro-batch while the GPU works on this one
            x, y = batch(step, micro + 1) if micro + 1 < local_accum else batch(step + 1, 0)
            scaler.scale(loss).backward()
        if cfg["grad_clip"] > 0.0:
            scaler.unscale_(optimizer)
            sharded.clip_grad_norm(raw_model.parameters(), cfg["grad_clip"])  # one norm, any layout
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        steps_timed += 1
        loop["tokens_seen"] += tokens_per_step

        stop = stops.agreed(step)  # the vote begun at the top of this step: all ranks stop after it
        last = step == cfg["max_iters"]
        do_log = step % cfg["log_interval"] == 0 or last or stop
        do_eval = (master or shards) and (step % cfg["eval_interval"] == 0 or last)
        if do_log:
            loss_now = loss.item() * local_accum  # the loop's one host-device sync: a micro-batch's
            dt = (time.perf_counter() - t0) / steps_timed
            mfu = peak and raw_model.estimate_mfu(tokens_per_step / dt, peak * world_size)
            log(f"step {step}: loss {loss_now:.4f}, lr {lr:.2e}, {dt * 1000:.1f} ms/step, "
                f"{tokens_per_step / dt:,.0f} tokens/s{f', mfu {mfu:.1%}' if mfu else ''}, "
                f"{pace.left(step, dt)} to go")  # the evaluations and saves still due counted
            metrics.record(step, loss=loss_now, lr=lr, ms_per_step=dt * 1000,
                           tokens_per_s=tokens_per_step / dt, tokens=loop["tokens_seen"], mfu=mfu)
        losses, improved = {}, False
        if do_eval:
            losses = pace.time("eval", step, estimate_loss, fast_model, splits, cfg, device,
                               autocast, shards)  # said first when it will take long
            improved = losses["val"] < loop["best_val_loss"]
            loop["best_val_loss"] = min(loop["best_val_loss"], losses["val"])
            log(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            metrics.record(step, train_loss=losses["train"], val_loss=losses["val"])
        # nanoGPT's always_save_checkpoint=False: also save where the val loss is the best yet
        do_save = (master or shards) and (step % cfg["checkpoint_interval"] == 0 or last or stop
                              or (improved and not cfg["always_save_checkpoint"]))
        saves.poll()  # a save that ended says so; one that failed stops the run here
        if do_save:
            best = loop["best_checkpoint"]
            if losses and (best is None or losses["val"] < best[0]):
                loop["best_checkpoint"] = best = [losses["val"], step]
            pace.time("save", step, saves.save, {
                "model": raw_model.state_dict(),  # clean names: no DDP module., compile _orig_mod.
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "step": step,
                "config": cfg,  # as given: a resume on another machine resolves device, dtype anew
                "model_args": model_args,
                "meta": meta,  # the vocabulary, so sample.py needs nothing but the checkpoint
                "data": data_id,  # a resume on other data is refused
                "train_loss": losses.get("train"), "val_loss": losses.get("val"),
                "written_at": time.time(),
                **loop,  # no RNG state: the seed and the step determine every batch and mask
            }, protect=[start_step] + ([best[1]] if cfg["keep_best"] and best else []))
        if do_log or do_eval or do_save:
            t0, steps_timed = time.perf_counter(), 0
        if stop:
            log(f"stopped by a signal after step {step}; rerun {stops.rerun} to resume")
            break
    saves.finish()  # the last checkpoint is on disk before the process exits
    if step == cfg["max_iters"]:
        log(outdir.finished(cfg, step))
    if ddp:  # the ranks leave together, and DDP lets go of the group before it is destroyed: a
        dist.barrier()  # rank tearing gloo down while rank 0 still saved was once seen to abort
        del model


if __name__ == "__main__":
    run_main(main, (checkpoint.CheckpointError,),
             interrupted="interrupted: stopped at once, without saving the current step; "
                         "rerun the same command to resume")
