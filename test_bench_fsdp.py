"""
bench_fsdp.py, cheaply: under torchrun with 2 ranks on a tiny GPT, FSDP2 holds half of DDP's parameters, gradients
and AdamW moments on every rank, and trains the same model; bad arguments are one line, before any process group.
"""
import re

import pytest

import bench_fsdp
from configurator import ConfigError
from conftest import run_ranks

TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=16", "--vocab_size=64", "--batch_size=2",
        "--warmup=1", "--steps=1", "--repeats=1"]


def test_fsdp_holds_half_of_ddps_state_on_each_of_two_ranks():
    # the two ranks as torchrun would start them, without torchrun's own start-up (seconds of this test's few)
    codes, (out, _) = run_ranks(["bench_fsdp.py", "--device=cpu", *TINY], timeout=120)
    assert codes == [0, 0], out[-2000:]
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
