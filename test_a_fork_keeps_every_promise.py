"""
A fork's edits keep every promise: each test copies the project into a folder of its own, makes there the edit a
forker would make (another optimizer, another model, another schedule, a new config key), and checks that the run
trains, resumes exactly, and that a checkpoint the edited code cannot load is refused in one line that names the
difference, exit 2, with nothing in out_dir moved.
"""
import glob
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import HERE, TINY, assert_identical, listing

# each a (file, text, the text a forker puts in its place)
SGD = ("model.py",
       '        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))',
       "        return torch.optim.SGD(groups, lr=learning_rate, momentum=0.9)")
EXTRA_WEIGHT = ("model.py",
                "        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)",
                "        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)\n"
                "        self.gate = nn.Parameter(torch.ones(config.n_embd))")
NEW_KEY = ("train.py",
           '    ("seed", 1337, "seeds the initial weights, the batches and dropout"),',
           '    ("seed", 1337, "seeds the initial weights, the batches and dropout"),\n'
           '    ("loss_scale", 1.0, "a fork\'s new key: multiplies the loss"),')
NEW_KEY_USED = ("train.py",
                "                loss = loss / local_accum  # the mean over micro-batches; DDP averages over the ranks",
                '                loss = loss * cfg["loss_scale"] / local_accum')
TENTH_AFTER_DECAY = ("train.py",
                     '    if step >= cfg["lr_decay_iters"]:\n        return cfg["min_lr"]',
                     '    if step >= cfg["lr_decay_iters"]:  # a fork\'s schedule\n'
                     '        return cfg["learning_rate"] / 10')

def fork(tmp_path, *edits):
    """A copy of the project's code in tmp_path/fork, with each (file, old, new) edit made once."""
    folder = tmp_path / "fork"
    folder.mkdir()
    for path in glob.glob(os.path.join(HERE, "*.py")):
        shutil.copy(path, folder)
    for name, old, new in edits:
        text = (folder / name).read_text()
        assert old in text, f"the edit's text is not in {name}: {old!r}"
        (folder / name).write_text(text.replace(old, new, 1))
    return folder


def train(code, dataset, out, *flags):
    """train.py of `code` as a process, with the tiny model."""
    return subprocess.run([sys.executable, "train.py", *TINY, f"--dataset={dataset}", f"--out_dir={out}", *flags],
                          cwd=code, capture_output=True, text=True, timeout=300)


def assert_refused_in_one_line(done, out, before, *facts):
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    for fact in facts:
        assert fact in done.stderr, (fact, done.stderr)
    assert listing(out) == before  # nothing moved, nothing written


def test_another_optimizer_trains_resumes_exactly_and_refuses_adamws_checkpoint(tmp_path, dataset):
    """SGD for AdamW: its groups have no betas, which set_hyperparameters leaves alone; its runs resume exactly;
    AdamW's checkpoint is refused by name, with the ways on."""
    original = train(HERE, dataset, tmp_path / "adamw", "--max_iters=10", "--checkpoint_interval=10")
    assert original.returncode == 0, original.stderr
    code = fork(tmp_path, SGD)
    before = listing(tmp_path / "adamw")
    done = train(code, dataset, tmp_path / "adamw", "--max_iters=20")
    assert_refused_in_one_line(done, tmp_path / "adamw", before, "AdamW", "SGD", "--from_checkpoint_step=0",
                               "init_from")
    for out, stops in (("whole", []), ("resumed", [10])):
        for max_iters in stops + [20]:
            done = train(code, dataset, tmp_path / out, f"--max_iters={max_iters}", "--checkpoint_interval=10")
            assert done.returncode == 0, done.stderr
    whole, resumed = (torch.load(tmp_path / out / "ckpt_0000020.pt", weights_only=True)
                      for out in ("whole", "resumed"))
    assert "momentum_buffer" in whole["optimizer"]["state"][0]
    assert "betas" not in whole["optimizer"]["param_groups"][0]
    assert_identical(whole, resumed)


def test_a_changed_model_refuses_the_old_checkpoint_at_a_resume_and_as_init_from(tmp_path, dataset):
    """A weight the old model lacks: a resume names it, init_from names it, each in one line, exit 2."""
    out = tmp_path / "out"
    done = train(HERE, dataset, out, "--max_iters=10", "--checkpoint_interval=10")
    assert done.returncode == 0, done.stderr
    code = fork(tmp_path, EXTRA_WEIGHT)
    before = listing(out)
    done = train(code, dataset, out, "--max_iters=20")
    assert_refused_in_one_line(done, out, before, "gate", "--from_checkpoint_step=0")
    done = train(code, dataset, tmp_path / "new", f"--init_from={out}")
    assert done.returncode == 2 and "gate" in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "new").exists()
    for script in (["sample.py", "--num_samples=1", "--max_new_tokens=2", "--device=cpu"],
                   ["export.py", f"--export_dir={tmp_path / 'hf'}"]):
        done = subprocess.run([sys.executable, *script, f"--out_dir={out}"], cwd=code, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 2 and "gate" in done.stderr, (script, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert listing(out) == before and not (tmp_path / "hf").exists()


def test_a_new_config_key_is_inherited_and_its_change_at_a_resume_is_said(tmp_path, dataset):
    """A new CONFIG row is all a new key needs: a checkpoint that predates it resumes (at its default), and a
    change of it is said at the resume like any other."""
    code = fork(tmp_path, NEW_KEY, NEW_KEY_USED)
    out = tmp_path / "out"
    assert train(HERE, dataset, out, "--max_iters=10", "--checkpoint_interval=10").returncode == 0
    done = train(code, dataset, out, "--max_iters=20", "--loss_scale=2.0")
    assert done.returncode == 0, done.stderr
    assert "loss_scale" in done.stdout.split("\n", 1)[0] and "2.0" in done.stdout.split("\n", 1)[0], done.stdout
    state = torch.load(out / "ckpt_0000020.pt", weights_only=True)
    assert state["config"]["loss_scale"] == 2.0


@pytest.mark.parametrize("key, value, no_effect", [("learning_rate", "0.002", False), ("warmup_iters", "2", True)])
def test_a_forks_schedule_is_what_the_resume_message_asks(tmp_path, dataset, key, value, no_effect):
    """Past lr_decay_iters the fork's schedule keeps learning_rate / 10: a changed learning_rate acts there (the
    old cosine's 'no effect' would be false), a changed warmup_iters has none. get_lr itself is asked."""
    code = fork(tmp_path, TENTH_AFTER_DECAY)
    out = tmp_path / "out"
    done = train(code, dataset, out, "--max_iters=10", "--checkpoint_interval=10", "--lr_decay_iters=8")
    assert done.returncode == 0, done.stderr
    done = train(code, dataset, out, "--max_iters=12", "--lr_decay_iters=8", f"--{key}={value}")
    assert done.returncode == 0, done.stderr
    line = done.stdout.split("\n", 1)[0]
    assert key in line, line
    assert ("no effect" in line) == no_effect, line
