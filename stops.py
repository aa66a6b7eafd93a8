"""
How a script ends, all in one place: its exit code, its last line, and the signals that stop it.

Every script's entry point is run_main: bad input (ConfigError, and the error classes a script names) is one line
on stderr and exit 2, Ctrl-C is exit 130, success is 0. Under torchrun rank 0 alone prints, since the other ranks
would say the same.

train.py's run stops on signals itself (StopSignals): SIGTERM, SIGUSR1 (what schedulers send before they take the
machine) and Ctrl-C ask the loop to save the step it is on and end, exit 0. Under DDP the ranks vote, so that every
rank stops after the same step. Before the run takes the signals over, and after it lets them go, run_main decides:
before, a signal stops the script at once, as Ctrl-C does by default; after, the exit code is already decided and
a signal changes nothing.

Exit codes: 0 done, or stopped by a signal with the step saved; 1 a bug (a traceback), or under torchrun another
rank lost (one line: torchrun restarts the job when --max-restarts allows); 2 bad input, a checkpoint that cannot
be used, or a disk that failed; 130 stopped at once by Ctrl-C, the current step not saved.
"""
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

import checkpoint
from configurator import ConfigError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)  # Ctrl-C, and what schedulers send before a kill
# what gloo and NCCL say when a collective fails because another rank of the job has gone
PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL communicator was aborted")


def is_rank_0():
    """Whether this process speaks for the job: rank 0 under torchrun (the others would say the same), or alone."""
    return int(os.environ.get("RANK", 0)) == 0


class ScriptSignals:
    """run_main's handler of STOP_SIGNALS until the run takes them over: a signal stops the script at once,
    as Ctrl-C does by default (KeyboardInterrupt, exit 130, nothing saved)."""

    def __call__(self, signum, frame):
        raise KeyboardInterrupt


def run_main(main, errors=(), interrupted=None):
    """A script's entry point: main(argv), with ConfigError and the given error classes printed as one line on
    stderr and exit code 2. With `interrupted`, Ctrl-C prints it (or the KeyboardInterrupt's own message) and
    exits 130, and the script is one that stops on signals itself (train.py): until its StopSignals takes them
    over, SIGTERM and SIGUSR1 stop it at once too. Once main has returned or raised, the exit code is decided:
    a signal from then on, up to the interpreter's last instant, is ignored."""
    speak = is_rank_0()
    if interrupted is None:
        handled = ()
    else:
        handled = STOP_SIGNALS
    for sig in handled:
        signal.signal(sig, ScriptSignals())
    code = 0
    line = None
    try:
        main(sys.argv[1:])
    except (ConfigError, *errors) as e:
        code = 2
        line = f"error: {e}"
    except KeyboardInterrupt as e:
        # a KeyboardInterrupt raised with a message says what to do next
        if interrupted is None and not e.args:
            raise
        code = 130
        line = e.args[0] if e.args else interrupted
    except (RuntimeError, dist.DistError) as e:
        # the expected death of a peer: said in a line; a RuntimeError of any other kind is a bug, and a traceback
        lost = [words for words in PEER_LOST if words in str(e)]
        if "RANK" not in os.environ or not lost:
            raise
        code = 1
        line = (f"error: rank {os.environ['RANK']} lost the job's other ranks ({lost[0]}): one of them died or "
                f"stopped; torchrun restarts the job if --max-restarts allows, from the newest checkpoint")
    # SIG_IGN outlives the interpreter's teardown, which sets a signal with a Python handler back to its default
    for sig in handled:
        signal.signal(sig, signal.SIG_IGN)
    if line and speak:
        print(line, file=sys.stderr)
    if code:
        sys.exit(code)


class StopSignals:
    """The run's handler of STOP_SIGNALS, entered on its first line, so that a signal during start-up is handled
    as one in the loop: the run finishes its step, saves it, and exits 0.

    A second Ctrl-C, a second or more after the first (torchrun passes each one on to the workers the terminal
    sent it to), stops at once: exit 130, the final save (a stop's, or max_iters') cancelled, unless that save is
    on disk already: then the run ends as a stop that saved, exit 0. Leaving restores the handlers it replaced
    (SIG_IGN in place of run_main's: the exit code is decided then)."""

    def __init__(self, cfg, ddp):
        self.cfg = cfg  # max_iters is read when the run ends: a resume may have changed it
        self.out_dir = cfg["out_dir"]  # where the checkpoints are written: outdir.Run sets a bucket's staging folder
        self.ddp = ddp
        self.speak = is_rank_0()
        self.received = []  # (signal number, time) of each signal
        self.final = None  # the step whose save is the run's last: a stop's, or max_iters'
        self.leaving = False
        self.said_saved = False
        self.flag = torch.zeros(1, dtype=torch.int32)  # this rank's vote, then the vote's outcome
        self.pending = None  # the vote's all-reduce, running while a step computes

    def rerun(self):
        """What to rerun to carry on: after a rewind, the command without its --from_checkpoint_step."""
        if self.cfg["from_checkpoint_step"] == -1:
            return "the same command"
        return "the command without --from_checkpoint_step (with it, it would rewind again)"

    def final_is_saved(self):
        """Whether the run's last checkpoint is on disk under its final name, complete."""
        if self.final is None:
            return False
        return os.path.exists(checkpoint.path_for(self.out_dir, self.final))

    def on_signal(self, signum, frame):
        now = time.monotonic()
        earlier_ctrl_c = [t for s, t in self.received if s == signal.SIGINT and now - t > 1.0]
        self.received.append((signum, now))
        if signum != signal.SIGINT or not earlier_ctrl_c or self.leaving:
            return  # the loop reads self.received after its step; leaving, the outcome is decided
        if not self.final_is_saved():
            raise KeyboardInterrupt(f"interrupted: stopped at once, without saving the current step; "
                                    f"rerun {self.rerun()} to resume")
        if self.speak and not self.said_saved:
            # os.write, not print: a print here could land inside one of the loop's own prints
            os.write(2, f"step {self.final} is saved: ending; a signal changes nothing\n".encode())
            self.said_saved = True

    def __enter__(self):
        self.previous = {}
        for sig in STOP_SIGNALS:
            self.previous[sig] = signal.signal(sig, self.on_signal)
        return self

    def __exit__(self, kind, error, traceback):
        self.leaving = True
        for sig, handler in self.previous.items():
            if isinstance(handler, ScriptSignals):
                signal.signal(sig, signal.SIG_IGN)
            else:
                signal.signal(sig, handler)
        # a second Ctrl-C whose cancel came once the last file was complete: the run saved, and ends as a stop
        saved_anyway = kind is KeyboardInterrupt and self.final_is_saved()
        if saved_anyway and self.speak:
            print(f"stopped after step {self.final}, saved before Ctrl-C could cancel it; "
                  f"rerun {self.rerun()} to resume")
        return saved_anyway  # True suppresses the KeyboardInterrupt: exit 0

    def vote(self):
        """Begin the ranks' vote on 'has any rank been signalled?', an all-reduce that runs while a step computes."""
        if self.ddp:
            self.flag.fill_(1 if self.received else 0)
            self.pending = dist.all_reduce(self.flag, op=dist.ReduceOp.MAX, async_op=True)

    def agreed(self, step):
        """Whether to stop after `step`, the step just done: the outcome of the vote begun before it, the same on
        every rank."""
        if self.ddp:
            self.pending.wait()
            stop = bool(self.flag.item())
        else:
            stop = bool(self.received)
        if stop or step >= self.cfg["max_iters"]:
            self.final = step  # what remains of the run is this step's save
        return stop

