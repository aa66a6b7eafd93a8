"""
Where a run computes, and how: the device (auto, cpu, cuda, cuda:N, mps; under torchrun the GPU of LOCAL_RANK),
the dtype (auto: bfloat16 on a GPU that has it, else float16 with loss scaling; float32 on a CPU), deterministic
kernels, TF32, and the GPU's peak FLOP/s for MFU. resolve_device and resolve_dtype are pure functions of what the
machine has, so a CPU test covers every GPU case; setup_runtime applies them before anything touches CUDA.

Under torchrun, join_job joins the job's process group and leaves it: each start of the job (torchrun
--max-restarts starts the workers again after one died) rejoins under a store prefix of its own, and a run that
ends without an exception exits 0 once Python's exit functions have run, never aborted by a gloo thread.
"""
import atexit
import importlib
import os
import sys
import time
import uuid
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist

from configurator import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# dense bf16 (or fp16) peak FLOP/s by the words of torch.cuda.get_device_name, for MFU; the first match wins
PEAK_FLOPS = [(("H100", "PCIe"), 756e12), (("H100", "NVL"), 835e12), (("H100",), 989e12), (("H200",), 989e12),
              (("GH200",), 989e12), (("B200",), 2250e12), (("A100",), 312e12), (("A10",), 125e12),
              (("L40S",), 362e12), (("L4",), 121e12), (("4090",), 165e12), (("3090",), 71e12), (("V100",), 125e12),
              (("T4",), 65e12)]


def check_device(device, dtype, local_rank=None):
    """Refuse a device or dtype this machine cannot give, without starting CUDA."""
    if dtype != "auto" and dtype not in DTYPES:
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
        raise ConfigError(f"device={requested} but this machine has {cuda_count} GPU(s): "
                          f"cuda:0 to cuda:{cuda_count - 1}")
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
    autocast = nullcontext() if dtype == "float32" else torch.autocast(device.type, dtype=DTYPES[dtype])
    return device, dtype, autocast


def peak_flops(device, name=None):
    """The GPU's dense bf16 peak from PEAK_FLOPS by its name (CUDA's, unless given), or None (MFU prints n/a) for
    a CPU or a GPU not in the table."""
    if device.type != "cuda":
        return None
    words = set((torch.cuda.get_device_name(device) if name is None else name).replace("-", " ").split())
    return next((flops for key, flops in PEAK_FLOPS if words.issuperset(key)), None)


@contextmanager
def join_job(backend="gloo", timeout=dist.default_pg_timeout):
    """Join the process group of the job torchrun started (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), under a
    prefix of its store that this start of the job alone uses; destroy it on the way out. torchrun keeps one store
    for all the starts of a job (the agent's own, which MASTER_ADDR:MASTER_PORT names, on one node or many), and
    the keys of the workers that died are in it: under their names, the workers of a restart would read a dead
    rank's address and fail or wait forever (pytorch/pytorch#135712). A run that ends without an exception then
    ends its process in exit_cleanly, after Python's exit functions."""
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    # torch's env:// store, as init_process_group would make it: a client of the agent's under torchrun
    store = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))[0]
    start = name_this_start(dist.PrefixStore("job-starts", store), rank, world_size, timeout)
    dist.init_process_group(backend, store=dist.PrefixStore(start, store), rank=rank, world_size=world_size,
                            timeout=timeout)
    try:
        yield
    finally:
        dist.destroy_process_group()
    atexit.register(exit_cleanly)  # reached only by a run that ended without an exception


def name_this_start(store, rank, world_size, timeout):
    """A name for this start of the job: the same on every rank, and new. TORCHELASTIC_RESTART_COUNT cannot be it:
    an agent that restarts its workers because another node's died does not count that restart ("membership changes
    do not count as retries", torch.distributed.elastic.agent.server.api), so the nodes of a job may count apart.
    Rank 0 names the start with a fresh uuid, and answers each rank, which asks under a fresh uuid of its own: what
    hello/<rank> holds may be an earlier start's question until that rank asks, so rank 0 answers every new one it
    reads until each rank says it has the name."""
    me = uuid.uuid4().hex
    if rank:
        store.set(f"hello/{rank}", me)
        name = store.get(f"welcome/{me}").decode()  # a key no earlier start can have written
        store.set(f"{name}/ready/{rank}", "")
        return name
    ready = [f"{me}/ready/{r}" for r in range(1, world_size)]
    answered = set()
    deadline = time.monotonic() + timeout.total_seconds()
    while not store.check(ready):
        if time.monotonic() > deadline:
            raise TimeoutError(f"not every rank of the job joined within {timeout}")
        for hello in set(store.multi_get([f"hello/{r}" for r in range(1, world_size)])) - answered:
            store.set(f"welcome/{hello.decode()}", me)
            answered.add(hello)
        time.sleep(0.01)
    return me


def exit_cleanly():
    """The end of a finished run's process: Python's exit functions, then exit code 0 without finalizing the
    interpreter. A gloo group can outlive destroy_process_group (FSDP2's state holds its group, and gc cannot free
    it), and its worker thread may drop the last reference to a collective's tensor just as the process exits: it
    then takes the GIL to free the tensor's Python object, torch checking only Py_IsInitialized() first. A thread
    that reaches the GIL once finalizing has begun is ended by CPython with pthread_exit, whose unwinding through a
    noexcept destructor calls std::terminate: "terminate called without an active exception", SIGABRT, and torchrun
    reports a finished job failed. Not finalizing leaves no moment for that."""
    # the exit functions registered before this one (logging's, multiprocessing's) would run after it: run them
    atexit.unregister(exit_cleanly)  # now, which os._exit would skip, but not this one again
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
