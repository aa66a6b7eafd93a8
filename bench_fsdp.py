"""
What FSDP2 saves in memory, and what it costs in time, against DDP, from one launch: the same GPT is trained a
few steps under DDP, then under FSDP2 (sharded.shard), and every rank's numbers are printed side by side with
the ratio FSDP2 / DDP: the bytes it holds of parameters, of gradients and of AdamW's state (exp_avg, exp_avg_sq
and the step counts), their total, its peak memory (on a GPU) and the mean step time.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 bench_fsdp.py      # CPU: gloo
    torchrun --standalone --nproc_per_node=8 bench_fsdp.py --n_layer=12 --n_head=12 --n_embd=768   # GPUs: NCCL
    python bench_fsdp.py                       # one process: nothing is sharded, the byte ratios are 1.00x

Both sides are set up as train.py sets them up: model.py's GPT seeded alike on every rank, AdamW from its
configure_optimizers, DDP or sharded.shard (each Block, then the root), the gradients over a NCCL group of their
own on CUDA (gloo, the default group, carries the rest and everything on a CPU), model.clip_grad_norm. The
batches are synthetic tokens (torch.randint with a fixed seed per rank, so no dataset is needed), the same on
both sides: the last step's loss of each side is printed as a check that both trained the same model.
Bytes are those of the tensors a rank holds, a DTensor's local shard (to_local()) for FSDP2. The GPU's peak
(torch.cuda.max_memory_allocated over the steps) also counts activations, DDP's gradient buckets and the Blocks
FSDP2 gathers for their forward and backward; a CPU has no such counter, and there the tensor bytes are all.
"""
import gc
import os
import time

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

import sharded
from configurator import ConfigError, check_ranges, parse
from stops import run_main
from device import check_device, setup_runtime
from model import GPT, GPTConfig, clip_grad_norm

CONFIG = [  # (key, default, what it sets)
    ("device", "auto", "auto (each rank's GPU when there is one, else the CPU), cpu or cuda"),
    ("dtype", "auto", "auto (bfloat16 on a GPU, float32 on a CPU), float32 or bfloat16: FSDP2 refuses float16"),
    ("n_layer", 4, "transformer blocks"),
    ("n_head", 4, "attention heads per block"),
    ("n_embd", 256, "embedding width; a multiple of n_head"),
    ("block_size", 128, "context length in tokens, and the length of every sequence"),
    ("vocab_size", 1024, "tokens in the vocabulary; the batches draw from all of it"),
    ("bias", False, "biases in Linear and LayerNorm layers, as train.py's key"),
    ("batch_size", 4, "sequences per step on each rank"),
    ("warmup", 2, "untimed steps of each training first: AdamW's state is made, the allocator warms up"),
    ("steps", 6, "timed steps of each training, after the warm-up"),
    ("repeats", 2, "times each side is trained, DDP and FSDP2 in turn, keeping the faster: noise only slows one"),
    ("seed", 1337, "seeds the weights (the same on every rank and side) and each rank's batches"),
]
SHAPE = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias")


def check(cfg):
    """One line for the first bad value, before any process group or device is touched."""
    check_ranges(cfg, positive=("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "batch_size", "warmup",
                                "steps", "repeats"), not_negative=("seed",))
    if cfg["n_embd"] % cfg["n_head"]:
        raise ConfigError(f"n_embd={cfg['n_embd']} must be divisible by n_head={cfg['n_head']}")
    if cfg["device"].partition(":")[0] not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, got {cfg['device']!r}: DDP and FSDP2 need one of them")
    if cfg["dtype"] not in ("auto", "float32", "bfloat16"):
        why = ": FSDP2 has no sharded loss scaler (sharded.shard refuses it)" if cfg["dtype"] == "float16" else ""
        raise ConfigError(f"dtype must be auto, float32 or bfloat16, got {cfg['dtype']!r}{why}")
    check_device(cfg["device"], cfg["dtype"], int(os.environ["LOCAL_RANK"]) if "LOCAL_RANK" in os.environ else None)


def held(tensors):
    """Bytes of the tensors (model.parameters() gives the tied embedding once); of a DTensor, this rank's shard."""
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in local)


def train(kind, cfg, device, dtype, autocast, grad_group, batches):
    """Train a fresh model `warmup + steps` steps under DDP or FSDP2, as train.py does; returns what this rank
    held and how fast it went."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(cfg["seed"])
    model = GPT(GPTConfig(**{k: cfg[k] for k in SHAPE}, dropout=0.0)).to(device)
    if kind == "FSDP2":
        sharded.shard(model, grad_group or dist.group.WORLD, device.type, dtype)
        net = model
    else:
        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, process_group=grad_group)
    optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), device.type)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out, times = dict.fromkeys(("parameters", "gradients")), []  # the table's order
    for i, (x, y) in enumerate(batches):
        sync()
        t0 = time.perf_counter()
        with autocast:
            _, loss = net(x, y)
        loss.backward()
        if i == 0:  # the same shapes at every step: counted once, in the untimed warm-up
            out["gradients"] = held(p.grad for p in model.parameters() if p.grad is not None)
        clip_grad_norm(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if i >= cfg["warmup"]:
            times.append(time.perf_counter() - t0)
    state = [s for per_param in optimizer.state.values() for s in per_param.items() if torch.is_tensor(s[1])]
    out["parameters"] = held(model.parameters())
    out["optimizer state"] = held(t for _, t in state)
    out["  of which step counts"] = held(t for key, t in state if key == "step")
    out["total"] = out["parameters"] + out["gradients"] + out["optimizer state"]
    if device.type == "cuda":
        out["peak memory"] = torch.cuda.max_memory_allocated(device)
    out["mean step time"] = sum(times) / len(times)
    out["loss at the last step"] = loss.item()
    del net, model, optimizer, loss  # before the next side is built: its peak is its own
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def cell(what, value, largest):
    """A quantity as the table shows it; bytes in MB, or in bytes when the row's largest is under 0.1 MB."""
    if what == "mean step time":
        return f"{value * 1e3:,.1f} ms"
    if what.startswith("loss"):
        return f"{value:.5f}"
    return f"{value / 1e6:,.2f} MB" if largest >= 1e5 else f"{value:,} B"


def table(results):
    """Rank, what, DDP, FSDP2, FSDP2 / DDP: one row per rank and quantity."""
    rows = [("rank", "what", "DDP", "FSDP2", "FSDP2 / DDP")]
    for rank, (ddp, fsdp) in enumerate(results):
        for what in ddp:
            ratio = fsdp[what] / ddp[what] if ddp[what] else float("nan")
            largest = max(ddp[what], fsdp[what])
            rows.append((str(rank), what, cell(what, ddp[what], largest), cell(what, fsdp[what], largest),
                         f"{ratio:.2f}x"))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return [" | ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]


def main(argv):
    cfg, _ = parse(CONFIG, argv)
    check(cfg)
    local_rank = int(os.environ["LOCAL_RANK"]) if "LOCAL_RANK" in os.environ else None
    device, dtype, autocast = setup_runtime(cfg["device"], cfg["dtype"], False, local_rank)
    if dtype == "float16":  # dtype=auto on a GPU without bfloat16
        raise ConfigError("this GPU has no bfloat16, and FSDP2 has no float16 (sharded.shard refuses it): "
                          "pass dtype=float32")
    if "RANK" in os.environ:  # as train.py: gloo carries everything but CUDA gradients
        dist.init_process_group(backend="gloo")
    else:  # one process without torchrun: a group of one, so DDP and FSDP2 run as they would under torchrun
        dist.init_process_group(backend="gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        grad_group = dist.new_group(backend="nccl") if device.type == "cuda" else None
        B, T = cfg["batch_size"], cfg["block_size"]
        tokens = torch.randint(cfg["vocab_size"], (cfg["warmup"] + cfg["steps"], B, T + 1),
                               generator=torch.Generator().manual_seed(cfg["seed"] + rank)).to(device)
        batches = [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]
        runs = {"DDP": [], "FSDP2": []}
        for _ in range(cfg["repeats"]):  # in turn, so that a slow spell of the machine falls on both sides
            for kind, done in runs.items():
                done.append(train(kind, cfg, device, dtype, autocast, grad_group, batches))
        mine = [min(done, key=lambda r: r["mean step time"]) for done in runs.values()]
        results = [None] * world
        dist.all_gather_object(results, mine)
        if rank == 0:
            n_params = sum(p.numel() for p in GPT(GPTConfig(**{k: cfg[k] for k in SHAPE})).parameters())
            name = torch.cuda.get_device_name(device) if device.type == "cuda" \
                else f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} thread(s) a rank"
            backend = "NCCL for gradients, gloo" if device.type == "cuda" else "gloo"
            print(f"bench_fsdp.py: {world} rank{'s' if world > 1 else ''} on {name}, {backend}, {dtype}, "
                  f"torch {torch.__version__}")
            print(f"GPT {cfg['n_layer']} layers x {cfg['n_embd']}, block {T}, vocab {cfg['vocab_size']}: "
                  f"{n_params / 1e6:.2f}M parameters; {B} x {T} tokens a rank a step")
            print("\n".join(table(results)))
            print(f"step time: the mean of {cfg['steps']} steps after {cfg['warmup']} warm-up, in the faster of "
                  f"{cfg['repeats']} trainings a side")
            if device.type != "cuda":
                print("peak memory: not measured, a CPU has no allocator counter; the bytes above are the tensors'")
            if world == 1:
                print("on 1 rank nothing is sharded: a shard is the whole tensor, so every byte ratio is 1.00x")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main)
