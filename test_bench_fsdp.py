"""
bench_fsdp.py, cheaply: under torchrun with 2 ranks on a tiny GPT, FSDP2 holds half of DDP's parameters, gradients
and AdamW moments on every rank, and trains the same model; bad arguments are one line, before any process group.
"""
import os
import re
import socket
import subprocess
import sys

import pytest

import bench_fsdp
from configurator import ConfigError

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=16", "--vocab_size=64", "--batch_size=2",
        "--warmup=1", "--steps=1", "--repeats=1"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp_holds_half_of_ddps_state_on_each_of_two_ranks():
    # the two ranks as torchrun would start them, without torchrun's own start-up (seconds of this test's few)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    ranks = [subprocess.Popen([sys.executable, "bench_fsdp.py", "--device=cpu", *TINY], cwd=HERE, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=env | {"RANK": str(r), "LOCAL_RANK": str(r)}) for r in (0, 1)]
    (out, err), _ = [p.communicate(timeout=120) for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0], err[-2000:]
    rows = re.findall(r"^(\d) +\| (.+?) +\| .+\| ([\d.]+)x$", out, re.M)
    ratio = {(int(rank), what.strip()): float(r) for rank, what, r in rows}
    for rank in (0, 1):
        for what in ("parameters", "gradients", "optimizer state", "total"):
            assert ratio[rank, what] == 0.5, (what, out)
        assert ratio[rank, "of which step counts"] == 1.0  # one scalar a parameter, whole on every rank
        assert ratio[rank, "loss at the last step"] == 1.0  # the same model, trained on the same batches
    assert "2 ranks on CPU" in out and "peak memory: not measured" in out


@pytest.mark.parametrize("flag, says", [("--n_head=3", "divisible by n_head"), ("--dtype=float16", "loss scaler"),
                                        ("--device=mps", "device must be"), ("--steps=0", "steps must be positive")])
def test_bad_arguments_are_refused_before_anything_starts(flag, says):
    with pytest.raises(ConfigError, match=says):
        bench_fsdp.main([flag])
