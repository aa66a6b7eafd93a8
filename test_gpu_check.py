"""
The GPU checks check: gpu_check.sh runs every check on a CPU, and fails when one misses.
    python3 -m pytest -q test_gpu_check.py
"""
import os
import subprocess
import sys

import torch

import checkpoint
import train
from conftest import HERE


CHECKS = [
    "train.py, no config flags (device auto)",
    "torchrun --nproc_per_node=1 (device auto)",
    "sample.py --device=auto",
    "deterministic: unbroken B == unbroken A",
    "deterministic: resumed C == unbroken A",
    "not deterministic: |A-C| <= |A-B|",
    "float16 + GradScaler: resumed == unbroken",
    "torchrun --fsdp=True, 1 process (FSDP2)",
    "sharded: resumed folder == unbroken",
    "sharded: resumed unsharded == sharded",
    "bench.py's table",
    "bench: our loop / plain loop, tokens/s",
    "bench: deterministic / not, tokens/s",
]


def gpu_check(*args, **env):
    return subprocess.run(["bash", os.path.join(HERE, "gpu_check.sh"), *args], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHON": sys.executable, **env})


def table(stdout):
    """The check table's rows: the lines after the heading, up to the first blank line."""
    return stdout.split("\n\n")[0].splitlines()[1:]


def test_gpu_check_runs_every_check_on_a_cpu():
    # no GPU visible: the runs with device auto must pick the CPU, even on a machine that has one
    done = gpu_check(DEVICE="cpu", SMALL="1", CUDA_VISIBLE_DEVICES="")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = table(done.stdout)
    assert not [row for row in rows if " MISSED " in row], done.stdout
    for name in CHECKS:
        ok = [row for row in rows if row.startswith(name + " ") and row[len(name):].split()[0] == "ok"]
        assert ok, (name, done.stdout)
    assert done.stdout.startswith("gpu_check.sh, ")
    assert "| deterministic tokens/s " in done.stdout  # bench.py's own table follows the checks


def test_a_missed_check_fails_the_script(tmp_path, capsys):
    # one real checkpoint (float16, so it has GradScaler state), and copies of it changed in one way each
    train.main(["--n_layer=1", "--n_head=1", "--n_embd=8", "--block_size=8", "--batch_size=2", "--max_iters=1",
                "--eval_iters=1", "--device=cpu", "--dtype=float16", f"--out_dir={tmp_path / 'a'}"])
    capsys.readouterr()
    a = checkpoint.path_for(str(tmp_path / "a"), 1)

    def copy(name, change=lambda state: None):
        state = checkpoint.load(a)
        change(state)
        os.makedirs(tmp_path / name)
        return checkpoint.save(str(tmp_path / name), 1, state)

    def flip_a_bit(state):  # in the first optimizer state tensor, whatever the optimizer calls it
        first = next(t for t in state["optimizer"]["state"][0].values() if t.dim() > 0)
        first.view(torch.int16).view(-1)[7] ^= 1

    same = copy("same")
    near = copy("near", lambda s: s["model"]["transformer.wte.weight"].add_(1e-3))
    far = copy("far", lambda s: s["model"]["transformer.wte.weight"].add_(1.0))
    one_bit = copy("one_bit", flip_a_bit)
    rescaled = copy("rescaled", lambda s: s["scaler"].update(scale=s["scaler"]["scale"] / 2))
    no_scaler = copy("no_scaler", lambda s: s.update(scaler={}))
    # three checks that hold, then five that miss, in one call (that the script exits 0 when every check holds,
    # test_gpu_check_runs_every_check_on_a_cpu shows)
    done = gpu_check("compare", "equal", "equal", a, same, "closer", "near is nearer than far", a, near, far,
                     "equal_scaler", "equal, with a scaler", a, same,
                     "equal", "one bit", a, one_bit, "equal", "another scale", a, rescaled,
                     "closer", "far is nearer than near", a, far, near,
                     "equal_scaler", "no scaler", no_scaler, no_scaler,
                     "equal", "a run that wrote nothing", a, str(tmp_path / "absent" / "ckpt_0000001.pt"))
    assert done.returncode == 1, done.stdout + done.stderr
    rows = done.stdout.splitlines()
    assert len(rows) == 8, done.stdout
    assert all(" ok " in row for row in rows[:3]) and all(" MISSED " in row for row in rows[3:]), done.stdout
    assert "optimizer.state.0." in rows[3] and "scaler.scale" in rows[4], done.stdout
    assert "ckpt_0000001.pt" in rows[7], done.stdout
