"""
What a run says, and its exit code, are the truth, on tiny models on the CPU:  python3 -m pytest -q test_messages.py
- two signals at any gap, or a stream of them while the run ends, never turn a stop that saved into exit 130 or a
  death by signal: exit 0, the step on disk (real processes: the claim is about exit codes);
- once the run's final checkpoint is on disk a second Ctrl-C changes nothing, and one that came too late to cancel
  it ends the run as the stop that saved (outdir.StopSignals, in-process, and real processes);
- a dataset prepared on first use is summed up once, by rank 0, even when another process prepared it;
- at a resume, a change that cannot move the learning rate of any step left is said to have no effect (checked
  against train.py's own get_lr), and gradient_accumulation_steps=0 is said as what it resolves to;
- no error comes after the line that says where the run starts;
- logs.Pace: the time left counts the evaluations and saves still due, and a long one is said before it starts.
"""
import fcntl
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import checkpoint
import dataset as data
import logs
import outdir
import test_train
import train
from configurator import ConfigError
from test_train import HERE, TINY, run, train_cmd, wait_for_line

# As in test_train.py: one thread per process, here and in the processes the tests start (they inherit it).
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"

dataset = test_train.dataset  # the fixture, shared: tests ask for it by name (the module is imported as data)

LONG_RUN = ["--max_iters=100000", "--checkpoint_interval=100000"]  # no checkpoint but the stop's
INTERRUPTED = "interrupted: stopped at once, without saving the current step"


def launch(cmd, patch=""):
    """train.py's command as a process whose output is read by lines; `patch`, Python run first in it (to slow a
    part of it down), makes it run train.py through runpy."""
    if patch:
        cmd = [sys.executable, "-c", f"{patch}\nimport runpy, sys\nsys.argv = {cmd[1:]!r}\n"
                                     f"runpy.run_path('train.py', run_name='__main__')"]
    return subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def send(proc, signum):
    if proc.poll() is None:  # never signal a pid that was reaped, and so may belong to another process now
        proc.send_signal(signum)


def assert_exit_agrees_with_disk(code, output, out):
    """The exit codes' table (docs/config.md): 0, the step it stopped at is saved and said; 130, stopped without
    saving it, in one last line, and no checkpoint of it (nor a temporary file) on disk."""
    steps = checkpoint.list_steps(str(out))
    assert "Traceback" not in output and not any(n.endswith(".tmp") for n in os.listdir(out)), output
    if code == 0:
        assert len(steps) == 1 and f"stopped by a signal after step {steps[0]};" in output, (steps, output)
        assert INTERRUPTED not in output, output
    else:
        assert code == 130 and output.rstrip("\n").splitlines()[-1].startswith(INTERRUPTED), (code, output)
        assert not steps, (steps, output)


def two_signals(out, dataset, how):
    """A run stopped by Ctrl-C at its first log line, then given more signals as `how` says: "0.5", a second Ctrl-C
    half a second later; "stream", a second one at once, then from the "stopped by a signal" line on a stream of
    Ctrl-Cs and SIGTERMs until it exits, through its save, its exit and the interpreter's teardown (all within 0.9 s
    of the first, so that by the one-second rule none is an interruption). Returns its exit code and output."""
    proc = launch(train_cmd(dataset, out, *LONG_RUN))
    with proc:
        seen = wait_for_line(proc, "step 5:")
        first = time.monotonic()
        send(proc, signal.SIGINT)
        if how == "0.5":
            time.sleep(0.5)
            send(proc, signal.SIGINT)
        else:
            send(proc, signal.SIGINT)
            seen += wait_for_line(proc, "stopped by a signal after step")
            while proc.poll() is None and time.monotonic() - first < 0.9:
                send(proc, random.choice((signal.SIGINT, signal.SIGTERM)))
                time.sleep(0.005)
        seen += proc.stdout.read()
    return proc.returncode, seen


def test_two_ctrl_cs_at_any_gap_exit_as_the_disk_says(tmp_path, dataset):
    """The run saves its step in a few ms and then spends a second or more exiting (the interpreter's teardown of
    torch): a second Ctrl-C 0.2-0.8 s after the first once killed it by SIGINT there, and a SIGTERM by SIGTERM."""
    hows = ("0.5", "stream")
    with ThreadPoolExecutor(len(hows)) as pool:  # at once: each waits for its own process most of the time
        results = list(pool.map(lambda how: two_signals(tmp_path / how, dataset, how), hows))
    for how, (code, output) in zip(hows, results):
        assert code == 0, (how, code, output)  # every later signal within a second: the same stop
        assert_exit_agrees_with_disk(code, output, tmp_path / how)


def run_main_script(tmp_path, body):
    """A script whose main is `body` (this function's argv), run by configurator.run_main as train.py's is."""
    script = tmp_path / "script.py"
    script.write_text(f"import atexit, os, signal, sys, time\nsys.path.insert(0, {HERE!r})\nimport configurator\n"
                      f"def main(argv):\n    {body}\n"
                      "configurator.run_main(main, interrupted='interrupted: nothing saved')\n")
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)


def test_run_main_stops_at_once_before_the_run_and_keeps_the_exit_code_after_it(tmp_path):
    """Before a run takes the signals over, SIGTERM too stops the script at once, in one line; once main has
    returned, a Ctrl-C, even one in the interpreter's teardown, changes no exit code."""
    done = run_main_script(tmp_path, "os.kill(os.getpid(), signal.SIGTERM); time.sleep(5)")
    assert (done.returncode, done.stderr) == (130, "interrupted: nothing saved\n"), done
    late = "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(0.2)))"
    done = run_main_script(tmp_path, late)
    assert (done.returncode, done.stderr) == (0, ""), done
    done = run_main_script(tmp_path, f"{late}; raise configurator.ConfigError('bad input')")
    assert (done.returncode, done.stderr) == (2, "error: bad input\n"), done


def test_a_second_ctrl_c_finds_the_final_checkpoint_on_disk_or_cancels_it(tmp_path, capfd):
    """outdir.StopSignals told the config and the step (as train.py is to tell it: see the report's lines), with
    real signals to this process; the first Ctrl-C is made to have come two seconds ago."""
    cfg = {"out_dir": str(tmp_path), "max_iters": 10, "from_checkpoint_step": -1}
    before = signal.getsignal(signal.SIGINT)
    ctrl_c = lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(0.01))
    with outdir.StopSignals(False, cfg) as stops:
        assert not stops.agreed(2)
        (tmp_path / "ckpt_0000002.pt").write_bytes(b"an interval checkpoint")
        ctrl_c()
        stops.received[0] = (signal.SIGINT, time.monotonic() - 2)
        with pytest.raises(KeyboardInterrupt, match=INTERRUPTED):  # mid-step: an older checkpoint is no excuse
            ctrl_c()
        assert stops.agreed(3)  # the stop's step: what is left is its save
        with pytest.raises(KeyboardInterrupt, match=INTERRUPTED):  # not on disk yet: the save is cancelled
            ctrl_c()
        (tmp_path / "ckpt_0000003.pt").write_bytes(b"the stop's checkpoint")
        ctrl_c()
        ctrl_c()  # on disk: nothing left to stop, said once
        assert capfd.readouterr().err == "step 3 is saved: ending; a signal changes nothing\n"
        raise KeyboardInterrupt(stops.interrupted)  # as a cancel that came after the file was complete
    assert signal.getsignal(signal.SIGINT) is before
    assert "stopped after step 3, saved before Ctrl-C could cancel it" in capfd.readouterr().out
    with pytest.raises(KeyboardInterrupt):  # a cancel that worked: 130
        with outdir.StopSignals(False, cfg) as stops:
            os.kill(os.getpid(), signal.SIGTERM)
            assert stops.agreed(4)
            raise KeyboardInterrupt(stops.interrupted)


def test_a_second_ctrl_c_after_the_save_is_written_changes_no_exit_code(tmp_path, dataset):
    """Ctrl-Cs a second and more after the first: one in the last moment of the save, the file whole and its rename
    made to wait 2 s (a slow disk), too late for the cancel; one as the run ends, its checkpoint written, the
    Saver's exit made to take 2 s (as wandb.finish can). Exit 0, as the disk says, and each said."""
    patch = ("import os, saver, time\nreplace, leave = os.replace, saver.Saver.__exit__\n"
             "os.replace = lambda a, b: (time.sleep(2) if 'ckpt_' in str(a) else None, replace(a, b))[1]\n"
             "saver.Saver.__exit__ = lambda *a: (leave(*a), time.sleep(2))[0]")
    out = tmp_path / "out"
    proc = launch(train_cmd(dataset, out, *LONG_RUN), patch)
    with proc:
        seen = wait_for_line(proc, "step 5:")
        send(proc, signal.SIGINT)
        for wait in (1.3, 2.2):  # into the rename's wait, then into the Saver's exit
            time.sleep(wait)
            send(proc, signal.SIGINT)
        seen += proc.stdout.read()
    assert proc.returncode == 0, seen
    assert_exit_agrees_with_disk(proc.returncode, seen, out)
    (step,) = checkpoint.list_steps(str(out))
    assert f"stopped after step {step}, saved before Ctrl-C could cancel it" in seen, seen
    assert f"step {step} is saved: ending; a signal changes nothing" in seen, seen


# --- a dataset prepared on first use ------------------------------------------------------------------------

def prepare_folder(tmp_path, name, text):
    """data/shakespeare_char's prepare.py (and the module it imports) in tmp_path/<name>/, with text as input.txt."""
    folder = tmp_path / name / "shakespeare_char"
    folder.mkdir(parents=True)
    shutil.copy(os.path.join(HERE, "data", "char_dataset.py"), folder.parent)
    shutil.copy(os.path.join(HERE, "data", "shakespeare_char", "prepare.py"), folder)
    (folder / "input.txt").write_text(text)
    return folder


def test_a_dataset_prepared_on_first_use_is_summed_up_once_by_rank_0(tmp_path, capsys, monkeypatch):
    shared = os.path.join(HERE, "..", "shared", "data", "tinyshakespeare.txt")
    text = open(shared if os.path.exists(shared) else os.__file__, encoding="utf-8").read()
    folder = prepare_folder(tmp_path, "a", text)
    _, train_ids, val_ids, _ = data.load_dataset(str(folder), 16)
    n = int(0.9 * len(text))
    assert (len(train_ids), len(val_ids)) == (n, len(text) - n)
    summary = (f"dataset {folder} prepared in {folder}: {n:,} train and {len(text) - n:,} val tokens; vocabulary: "
               f"{len(set(text))} characters\n")
    assert capsys.readouterr().out == f"dataset {folder} is not prepared yet: running {folder}/prepare.py\n" + summary
    data.load_dataset(str(folder), 16)
    assert capsys.readouterr().out == ""  # prepared before: nothing to say
    # another rank: it prepares, and leaves the summary to rank 0
    monkeypatch.setenv("RANK", "1")
    data.load_dataset(str(prepare_folder(tmp_path, "b", text[:5000])), 16)
    assert "prepared in" not in capsys.readouterr().out
    # rank 0 waits while another process prepares (it holds the lock, then writes the files): rank 0 sums up
    monkeypatch.setenv("RANK", "0")
    other = prepare_folder(tmp_path, "c", text)
    with open(other / "prepare.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        waiting = threading.Thread(target=data.load_dataset, args=(str(other), 16))
        waiting.start()
        time.sleep(0.3)
        for name in ("train.bin", "val.bin", "meta.json"):
            shutil.copy(folder / name, other)
    waiting.join()
    assert capsys.readouterr().out == summary.replace(str(folder), str(other))


# --- what a resume says it changed --------------------------------------------------------------------------

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


# --- the start line comes once nothing can fail on bad input ------------------------------------------------

def test_no_error_comes_after_the_line_that_says_where_the_run_starts(tmp_path, dataset, capsys):
    run(tmp_path / "run", dataset, "--max_iters=2")
    capsys.readouterr()
    cases = [  # (out_dir, flags): each fails after resolve_start has chosen the step
        ("fresh", ["--n_embd=30", "--n_head=4"]),
        ("fresh", ["--warmup_iters=50", "--lr_decay_iters=10"]),
        ("fresh", ["--vocab_size=3"]),
        ("fresh", [f"--init_from={tmp_path / 'nothing here'}"]),
        ("run", ["--dataset=no_such_dataset"]),
        ("run", ["--max_iters=4", "--dropout=1.5"]),
    ]
    for folder, flags in cases:
        with pytest.raises((ConfigError, checkpoint.CheckpointError)):
            train.main(TINY + [f"--dataset={dataset}", f"--out_dir={tmp_path / folder}", *flags])
        out = capsys.readouterr().out
        assert "starting fresh" not in out and "resuming from" not in out, (flags, out)


# --- logs.Pace ----------------------------------------------------------------------------------------------

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
