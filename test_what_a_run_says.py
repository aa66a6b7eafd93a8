"""
What a run says is the truth, on tiny models on the CPU:  python3 -m pytest -q test_what_a_run_says.py
- at a resume, a change that cannot move the learning rate of any step left is said to have no effect (checked
  against train.py's own get_lr), a key the checkpoint predates is a change, and gradient_accumulation_steps=0
  is no change where it resolves to the checkpoint's value;
- logs.Pace: the time left counts the evaluations and saves still due, and a long one is said before it starts;
- durations come from a monotonic clock: a wall clock that stands still or jumps back prints no negative time.
"""
import random
import time

import pytest

import logs
import outdir
import train
from conftest import run


SCHEDULE = {"decay_lr": True, "learning_rate": 1e-3, "min_lr": 1e-4, "warmup_iters": 100, "lr_decay_iters": 2000,
            "max_iters": 3000, "gradient_accumulation_steps": 1}
SCHEDULE_KEYS = ("learning_rate", "min_lr", "warmup_iters", "lr_decay_iters")  # keys train.py's get_lr reads


def changes(step, old, **new):
    """What a resume of step `step`, whose config is `old`, by a command that sets `new`, says it changed."""
    cfg = {**SCHEDULE, **old, **new, "out_dir": "out", "from_checkpoint_step": -1, "eval_only": False}
    return outdir.changed_keys(cfg, set(new), {**SCHEDULE, **old}, step, train.get_lr)


@pytest.mark.parametrize("step, old, new, no_effect", [
    (2500, {}, {"learning_rate": 6e-4}, True),  # past lr_decay_iters: min_lr throughout
    (2500, {}, {"warmup_iters": 50}, True),
    (2500, {}, {"lr_decay_iters": 2400}, True),
    (500, {"decay_lr": False}, {"min_lr": 1e-5}, False),  # decay_lr=False: get_lr reads no min_lr, says nothing
    (500, {}, {"learning_rate": 6e-4}, False),  # it applies: said plainly
    (2500, {}, {"lr_decay_iters": 2600}, False),  # the decay resumes: it applies
    (500, {}, {"seed": 7}, False),  # a key get_lr never reads: nothing is said of its effect
])
def test_a_change_at_a_resume_is_said_as_it_acts(step, old, new, no_effect):
    [change] = changes(step, old, **new)
    key = next(iter(new))
    assert change.startswith(f"{key}: ") and repr(new[key]) in change, change
    assert ("no effect" in change) == no_effect, change


def test_a_key_the_checkpoint_predates_is_a_change_and_an_unchanged_one_is_none():
    """A fork's new CONFIG row: the checkpoint has no such key, and the line says so; a key set to the value the
    checkpoint holds is no change."""
    cfg = {**SCHEDULE, "new_key": 2.0, "seed": 1337, "out_dir": "out", "from_checkpoint_step": -1}
    said = outdir.changed_keys(cfg, {"new_key", "seed"}, {**SCHEDULE, "seed": 1337}, 10, train.get_lr)
    assert len(said) == 1 and "new_key" in said[0] and "2.0" in said[0], said


def test_no_effect_is_said_only_where_get_lr_gives_every_step_left_the_same_rate():
    """Random schedules, resume steps and changed keys: wherever the line says "no effect", train.py's get_lr gives
    each step from the resume to max_iters the same learning rate under the old value and the new."""
    rng = random.Random(0)
    said = 0
    for _ in range(3000):
        warmup = rng.choice([0, 5, 20, 60])
        old = {"decay_lr": rng.random() < 0.7, "learning_rate": 1e-3, "min_lr": 1e-4, "warmup_iters": warmup,
               "lr_decay_iters": rng.choice([warmup, 60, 100]), "max_iters": rng.choice([80, 120, 200])}
        key = rng.choice(SCHEDULE_KEYS)
        if key in ("warmup_iters", "lr_decay_iters"):
            new = {key: old[key] + rng.choice([-20, 15, 40])}
        else:
            new = {key: old[key] * rng.choice([0.5, 2])}
        cfg = {**old, **new}
        if cfg["warmup_iters"] < 0 or cfg["warmup_iters"] > cfg["lr_decay_iters"]:
            continue  # check_config refuses it
        step = rng.randrange(0, cfg["max_iters"])
        rates = [[train.get_lr(s, c) for s in range(step, cfg["max_iters"])] for c in ({**cfg, **old}, cfg)]
        same = all(abs(a - b) <= 1e-12 for a, b in zip(*rates))
        if any("(no effect" in change for change in changes(step, old, **new)):
            said += 1
            assert same, (step, old, new)
    assert said > 300  # the rule was put to the test


def test_a_resume_says_what_its_command_changed(tmp_path, dataset, capsys):
    """The start line names each key changed with its old and new value, and what resolves to the checkpoint's
    value (gradient_accumulation_steps=0: one micro-batch a rank) is no change."""
    run(tmp_path, dataset, "--max_iters=12", "--checkpoint_interval=12", "--lr_decay_iters=10")
    capsys.readouterr()
    run(tmp_path, dataset, "--max_iters=14", "--learning_rate=0.002", "--gradient_accumulation_steps=0",
        "--lr_decay_iters=10")
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("resuming from step 12"), first
    assert "learning_rate: 0.001 -> 0.002 (no effect" in first and "max_iters: 12 -> 14" in first, first
    assert "gradient_accumulation_steps" not in first, first


# --- time ----------------------------------------------------------------------------------------------------------

def test_the_time_left_counts_the_evaluations_and_saves_still_due_and_a_long_one_is_said_first():
    """nanoGPT's config on a CPU: eval_interval=max_iters, so the one evaluation is the last step's, after the log
    line that once said 0:00:00 to go; 2 x 200 batches at a third of a 10 s step each is 22 minutes."""
    cfg = {"max_iters": 2000, "eval_interval": 2000, "checkpoint_interval": 1000, "eval_iters": 200}
    said = []
    pace = logs.Pace(cfg | {"gradient_accumulation_steps": 1}, said.append)
    assert pace.left(2000, 10.0) == "0:22:13"  # the last step's evaluation, after its log line
    assert pace.left(1990, 10.0) == "0:23:53"  # and 10 steps
    with pace.timed("eval", 2000):  # the estimate is said, then the evaluation runs
        assert len(said) == 1 and "step 2000" in said[0] and "0:22:13" in said[0], said
    assert pace.expected("eval") < 1  # measured now: what the next one expects
    with pace.timed("save", 1000):
        time.sleep(0.05)
    assert pace.left(1001, 1.0) == "0:16:39"  # 999 steps, an evaluation (~0 s) and a save (0.05 s) at step 2000
    pace.LONG = 0.04
    with pace.timed("save", 2000):
        pass
    assert "step 2000" in said[-1] and "saving" in said[-1], said


def test_a_frozen_or_stepped_wall_clock_changes_nothing(tmp_path, dataset, monkeypatch, capsys):
    """Durations (ms/step, the ETA, the double Ctrl-C rule) come from a monotonic clock: a wall clock that stands
    still or jumps back a day divides by nothing and prints no negative time."""
    readings = iter([1_800_000_000.0 - 86400 * (i % 2) for i in range(100000)])
    monkeypatch.setattr(time, "time", lambda: next(readings))
    run(tmp_path, dataset, "--max_iters=10")
    steps = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert steps and not any("-" in line.split("ms/step")[0].split(",")[-1] for line in steps)
