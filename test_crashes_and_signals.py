"""
A crash loses only the steps since the last checkpoint, and a signal saves the step (real processes: the claims
are about processes, exit codes and torchrun):  python3 -m pytest -q -n 2 test_crashes_and_signals.py
- kill -9 at random moments, mid-step and mid-save, then a rerun: the run ends equal to an unbroken one; under
  torchrun too (one rank killed, then the whole job), resumed as two nodes;
- SIGTERM, SIGUSR1 or Ctrl-C: the current step is saved, exit 0; under DDP every rank stops after the same step;
- a second Ctrl-C a second or more after the first stops at once (exit 130, no file left); two signals at any gap,
  or a stream of them while the run ends, never turn a stop that saved into exit 130 or a death by signal;
- once the run's final checkpoint is on disk a second Ctrl-C changes nothing, and one that came too late to cancel
  it ends the run as the stop that saved (stops.StopSignals, in-process, and real processes).
"""
import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import checkpoint
import stops
from conftest import (HERE, assert_identical, ddp_flags, free_port, kill_9_again_and_again, run, start, state_at,
                      stop_by_signal, torchrun_cmd, train_cmd, wait_for_line, worker_with_rank)


def test_kill_9_at_random_moments_loses_nothing(tmp_path, dataset, reference):
    out = tmp_path / "out"
    cmd = train_cmd(dataset, out, "--checkpoint_interval=1")
    assert kill_9_again_and_again(cmd, 0, 2, out) >= 1
    run(out, dataset, "--max_iters=40", "--checkpoint_interval=1")  # the rerun: what it computes is the claim
    assert_identical(state_at(reference, 40), state_at(out, 40))
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]  # the leftovers were cleaned up


def test_kill_9_under_torchrun_loses_nothing_and_two_nodes_resume_exactly(tmp_path, dataset, ddp_reference):
    """Rank 1 alone dies at a random moment, then the whole job mid-save. Then the job is requeued on two machines:
    two torchrun launchers on 127.0.0.1 stand for them, one rank each, and node 1 is told another step than
    node 0: rank 0's choice must win, or the ranks would train different timelines."""
    out = tmp_path / "out"
    cmd = torchrun_cmd(2, *ddp_flags(dataset, out, "--checkpoint_interval=1"))
    with start(cmd) as proc:
        wait_for_line(proc, "step 5:")
        time.sleep(random.Random(1).uniform(0.0, 0.5))
        os.kill(worker_with_rank(proc.pid, 1), signal.SIGKILL)
        proc.stdout.read()
        assert proc.wait(timeout=120) != 0  # no hang: torchrun ends the surviving rank
    assert 40 not in checkpoint.list_steps(str(out))
    assert kill_9_again_and_again(cmd, 1, 1, out) >= 1
    steps, port = checkpoint.list_steps(str(out)), free_port()
    nodes = [start(torchrun_cmd(1, *ddp_flags(dataset, out, "--checkpoint_interval=10",
                                              f"--from_checkpoint_step={step}"), nodes=(rank, port)))
             for rank, step in ((0, -1), (1, steps[0]))]
    outputs = [p.stdout.read() for p in nodes]
    assert [p.wait() for p in nodes] == [0, 0], outputs
    assert f"resuming from step {steps[-1]}" in outputs[0]
    assert set(checkpoint.list_steps(str(out))) - set(steps) == {s for s in (10, 20, 30, 40) if s > steps[-1]}
    assert_identical(state_at(ddp_reference, 40), state_at(out, 40))


def test_a_signal_saves_the_current_step_and_exits_cleanly(tmp_path, dataset, reference):
    """SIGTERM, and then Ctrl-C, stop a run, which saves its step and exits 0; the second run resumes the first
    and saves in the loop (async_checkpoint=False). SIGUSR1 stops a rank in the DDP test below."""
    out = tmp_path / "out"
    cmd = train_cmd(dataset, out, "--checkpoint_interval=100")  # no interval checkpoint before the last step
    for signum, saving in ((signal.SIGTERM, []), (signal.SIGINT, ["--async_checkpoint=False"])):
        code, rest, stopped = stop_by_signal(cmd + saving, out, lambda proc: proc.send_signal(signum))
        assert code == 0 and "Traceback" not in rest, rest
        # the checkpoint is what an interval checkpoint at that step would have been
        assert_identical(state_at(reference, stopped), state_at(out, stopped))


def test_ddp_ranks_agree_on_the_step_to_stop_at_and_resume_it_exactly(tmp_path, dataset, ddp_reference):
    """Three ways to stop a 2-rank run, each run resuming the one before; then one rank resumes the last. The
    dataset is not prepared yet: under torchrun the ranks queue on a lock, and only the first prepares it."""
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    (data / "prepare.py").write_text(
        "import os, shutil, time\nhere = os.path.dirname(os.path.abspath(__file__))\n"
        "open(os.path.join(here, 'runs'), 'a').write('x')\ntime.sleep(1)  # the other rank queues meanwhile\n"
        f"for name in ('train.bin', 'val.bin', 'meta.json'):\n    shutil.copy(os.path.join({dataset!r}, name), here)\n")
    cmd = torchrun_cmd(2, *ddp_flags(str(data), out, "--checkpoint_interval=100"))
    ways = {  # how: (send, torchrun's exit code)
        # only rank 1 hears it; rank 0 must stop at the same step
        "SIGUSR1-to-rank-1": (lambda proc: os.kill(worker_with_rank(proc.pid, 1), signal.SIGUSR1), 0),
        # torchrun passes SIGTERM on to every worker, then exits reporting the signal
        "SIGTERM-to-torchrun": (lambda proc: proc.send_signal(signal.SIGTERM), 1),
        # the terminal sends SIGINT to the whole job, and torchrun passes it on again: each worker hears it twice;
        # torchrun's own exit code then reports its own signal
        "Ctrl-C-in-a-terminal": (lambda proc: os.killpg(proc.pid, signal.SIGINT), None),
    }
    for how, (send, expected) in ways.items():
        code, rest, stopped = stop_by_signal(cmd, out, send)
        assert expected in (None, code) and "KeyboardInterrupt" not in rest, (how, rest)
        assert_identical(state_at(ddp_reference, stopped), state_at(out, stopped))
    assert (data / "runs").read_text() == "x"
    # a 2-rank checkpoint resumed on one rank, in this process, trains on the same global batches
    run(out, str(data), "--max_iters=40")
    assert_identical(state_at(ddp_reference, 40), state_at(out, 40))


# --- a second signal -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("saving", ["--async_checkpoint=True", "--async_checkpoint=False"], ids=["async", "sync"])
def test_a_second_ctrl_c_stops_at_once(tmp_path, dataset, reference, saving):
    """A second Ctrl-C, while the first one's save is being written (slowly), abandons it: exit 130, one line, and
    no file left beside the checkpoint the run resumed. (A first Ctrl-C alone saves the step: see
    test_a_signal_saves_the_current_step_and_exits_cleanly.)"""
    out = tmp_path / "out"
    out.mkdir()
    os.link(checkpoint.path_for(str(reference), 10), checkpoint.path_for(str(out), 10))
    slow = "import checkpoint, time\nwrite = checkpoint._Output.write\n" \
           "checkpoint._Output.write = lambda self, data: (time.sleep(0.05), write(self, data))[1]\n"
    proc = start([sys.executable, "-c", slow + "import runpy, sys\nsys.argv = "
                  + repr(train_cmd(dataset, out, "--checkpoint_interval=100", "--max_iters=1000", saving)[1:])
                  + "\nrunpy.run_path('train.py', run_name='__main__')"])
    wait_for_line(proc, "tokens per step")
    proc.send_signal(signal.SIGINT)
    while not any(n.endswith(".tmp") for n in os.listdir(out)):
        time.sleep(0.01)
    time.sleep(1.1)
    proc.send_signal(signal.SIGINT)
    rest = proc.stdout.read()
    assert proc.wait() == 130, rest
    assert rest.endswith("interrupted: stopped at once, without saving the current step; "
                         "rerun the same command to resume\n")
    assert "Traceback" not in rest
    assert sorted(os.listdir(out)) == ["ckpt_0000010.pt", "metrics.jsonl", "train.lock"]


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
    """A script whose main is `body` (this function's argv), run by stops.run_main as train.py's is."""
    script = tmp_path / "script.py"
    script.write_text(f"import atexit, os, signal, sys, time\nsys.path.insert(0, {HERE!r})\n"
                      "import configurator, stops\n"
                      f"def main(argv):\n    {body}\n"
                      "stops.run_main(main, interrupted='interrupted: nothing saved')\n")
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
    """stops.StopSignals told the config and the step (as train.py is to tell it: see the report's lines), with
    real signals to this process; the first Ctrl-C is made to have come two seconds ago."""
    cfg = {"out_dir": str(tmp_path), "max_iters": 10, "from_checkpoint_step": -1}
    before = signal.getsignal(signal.SIGINT)
    ctrl_c = lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(0.01))
    with stops.StopSignals(cfg, False) as signals:
        assert not signals.agreed(2)
        (tmp_path / "ckpt_0000002.pt").write_bytes(b"an interval checkpoint")
        ctrl_c()
        signals.received[0] = (signal.SIGINT, time.monotonic() - 2)
        with pytest.raises(KeyboardInterrupt, match=INTERRUPTED):  # mid-step: an older checkpoint is no excuse
            ctrl_c()
        assert signals.agreed(3)  # the stop's step: what is left is its save
        with pytest.raises(KeyboardInterrupt, match=INTERRUPTED):  # not on disk yet: the save is cancelled
            ctrl_c()
        (tmp_path / "ckpt_0000003.pt").write_bytes(b"the stop's checkpoint")
        ctrl_c()
        ctrl_c()  # on disk: nothing left to stop, said once
        assert capfd.readouterr().err == "step 3 is saved: ending; a signal changes nothing\n"
        raise KeyboardInterrupt("interrupted")  # as a cancel that came after the file was complete
    assert signal.getsignal(signal.SIGINT) is before
    assert "stopped after step 3, saved before Ctrl-C could cancel it" in capfd.readouterr().out
    with pytest.raises(KeyboardInterrupt):  # a cancel that worked: 130
        with stops.StopSignals(cfg, False) as signals:
            os.kill(os.getpid(), signal.SIGTERM)
            assert signals.agreed(4)
            raise KeyboardInterrupt("interrupted")


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
