"""
What a run says is the truth, on tiny models on the CPU:  python3 -m pytest -q test_what_a_run_says.py
- at a resume, a change that cannot move the learning rate of any step left is said to have no effect (checked
  against train.py's own get_lr), and gradient_accumulation_steps=0 is said as what it resolves to;
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


def resume_line(step, old, **new):
    """start_line of a resume of step `step`, whose config is `old`, by a command that sets `new`."""
    cfg = {**SCHEDULE, **old, **new, "out_dir": "out", "from_checkpoint_step": -1, "eval_only": False}
    return outdir.start_line(cfg, set(new), step, {"config": {**SCHEDULE, **old}}, None)


@pytest.mark.parametrize("step, old, new, said", [
    (2500, {}, {"learning_rate": 6e-4}, "learning_rate: 0.001 -> 0.0006 (no effect: step 2500 is past "
                                        "lr_decay_iters, where the learning rate stays min_lr=0.0001)"),
    (2500, {}, {"warmup_iters": 50}, "warmup_iters: 100 -> 50 (no effect: step 2500 is past lr_decay_iters"),
    (2500, {}, {"lr_decay_iters": 2400}, "lr_decay_iters: 2000 -> 2400 (no effect: step 2500 is past"),
    (500, {"decay_lr": False}, {"min_lr": 1e-5}, "min_lr: 0.0001 -> 1e-05 (no effect: decay_lr=False keeps"),
    (500, {}, {"learning_rate": 6e-4}, "learning_rate: 0.001 -> 0.0006; "),  # it applies: said plainly
    (2500, {}, {"lr_decay_iters": 2600}, "lr_decay_iters: 2000 -> 2600; "),  # the decay resumes: it applies
    (10, {"gradient_accumulation_steps": 4}, {"gradient_accumulation_steps": 0},
     "gradient_accumulation_steps: 4 -> 0 (0: one micro-batch a rank, 1)"),
])
def test_a_change_at_a_resume_is_said_as_it_acts(step, old, new, said):
    assert said in resume_line(step, old, **new) + "; "


def test_a_change_that_resolves_to_the_checkpoints_value_is_no_change():
    line = resume_line(10, {"gradient_accumulation_steps": 1, "seed": 1337}, gradient_accumulation_steps=0, seed=7)
    assert line == "resuming from step 10; changed by this command: seed: 1337 -> 7"


def test_no_effect_is_said_only_where_get_lr_gives_every_step_left_the_same_rate():
    """Random schedules, resume steps and changed keys: wherever the line says "no effect", train.py's get_lr gives
    each step from the resume to max_iters the same learning rate under the old value and the new."""
    rng, said = random.Random(0), 0
    for _ in range(3000):
        warmup = rng.choice([0, 5, 20, 60])
        old = {"decay_lr": rng.random() < 0.7, "learning_rate": 1e-3, "min_lr": 1e-4, "warmup_iters": warmup,
               "lr_decay_iters": rng.choice([warmup, 60, 100]), "max_iters": rng.choice([80, 120, 200])}
        key = rng.choice(outdir.SCHEDULE_KEYS)
        new = {key: old[key] + rng.choice([-20, 15, 40]) if key in ("warmup_iters", "lr_decay_iters")
               else old[key] * rng.choice([0.5, 2])}
        cfg = {**old, **new}
        if cfg["warmup_iters"] < 0 or cfg["warmup_iters"] > cfg["lr_decay_iters"]:
            continue  # check_config refuses it
        step = rng.randrange(0, cfg["max_iters"])
        rates = [[train.get_lr(s, c) for s in range(step, cfg["max_iters"])] for c in ({**cfg, **old}, cfg)]
        same = all(abs(a - b) <= 1e-12 for a, b in zip(*rates))
        if "(no effect" in resume_line(step, old, **new):
            said += 1
            assert same, (step, old, new)
    assert said > 300  # the rule was put to the test


def test_a_resume_says_what_its_command_changed(tmp_path, dataset, capsys):
    run(tmp_path, dataset, "--max_iters=12", "--checkpoint_interval=12", "--lr_decay_iters=10")
    capsys.readouterr()
    run(tmp_path, dataset, "--max_iters=14", "--learning_rate=0.002", "--gradient_accumulation_steps=0",
        "--lr_decay_iters=10")
    out = capsys.readouterr().out
    assert ("resuming from step 12; changed by this command: learning_rate: 0.001 -> 0.002 (no effect: step 12 is "
            "past lr_decay_iters, where the learning rate stays min_lr=0.0001); max_iters: 12 -> 14\n") in out, out


# --- time ----------------------------------------------------------------------------------------------------------

def test_the_time_left_counts_the_evaluations_and_saves_still_due_and_a_long_one_is_said_first():
    """nanoGPT's config on a CPU: eval_interval=max_iters, so the one evaluation is the last step's, after the log
    line that once said 0:00:00 to go; 2 x 200 batches at a third of a 10 s step each is 22 minutes."""
    cfg = {"max_iters": 2000, "eval_interval": 2000, "checkpoint_interval": 1000, "eval_iters": 200}
    said = []
    pace = logs.Pace(cfg, 1, said.append)
    assert pace.left(2000, 10.0) == "0:22:13"  # the last step's evaluation, after its log line
    assert pace.left(1990, 10.0) == "0:23:53"  # and 10 steps
    assert pace.time("eval", 2000, lambda x: x + 1, 1) == 2  # the estimate is said, then the evaluation runs
    assert said == ["step 2000: estimating the train and val loss on eval_iters=200 batches each, about 0:22:13"]
    assert pace.expected("eval") < 1  # measured now: what the next one expects
    pace.time("save", 1000, time.sleep, 0.05)
    assert pace.left(1001, 1.0) == "0:16:39"  # 999 steps, an evaluation (~0 s) and a save (0.05 s) at step 2000
    pace.LONG = 0.04
    pace.time("save", 2000, lambda: None)
    assert said[-1] == "step 2000: saving a checkpoint, about 0:00:00"


def test_a_frozen_or_stepped_wall_clock_changes_nothing(tmp_path, dataset, monkeypatch, capsys):
    """Durations (ms/step, the ETA, the double Ctrl-C rule) come from a monotonic clock: a wall clock that stands
    still or jumps back a day divides by nothing and prints no negative time."""
    readings = iter([1_800_000_000.0 - 86400 * (i % 2) for i in range(100000)])
    monkeypatch.setattr(time, "time", lambda: next(readings))
    run(tmp_path, dataset, "--max_iters=10")
    steps = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert steps and not any("-" in line.split("ms/step")[0].split(",")[-1] for line in steps)
