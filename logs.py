"""
A run's log: metrics.jsonl in its out_dir, one JSON object a line ({"step": ..., "time": ..., and what was
measured}), appended and fsynced by rank 0, and Weights & Biases when wandb_log is on (NoWandb stands in when it
is off, so the loop calls one thing either way). metrics.jsonl is the history of the live timeline: a rewind
(housekeeping.py) splits it with split_metrics. A line that is no record of ours, a note added by hand say, is kept.
Pace times what the loop prints: the time left, and a line before an evaluation or save that will take long.
"""
import json
import os
import time
import uuid
from contextlib import contextmanager

import torch.distributed as dist

import checkpoint
from configurator import ConfigError


def metrics_path(folder):
    return os.path.join(folder, "metrics.jsonl")


def write_whole(path, lines):
    """Replace the file at path with these lines (bytes): a temporary file, fsynced, renamed, the folder fsynced."""
    with open(path + ".tmp", "wb") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    checkpoint.fsync_dir(os.path.dirname(path) or ".")


def split_metrics(out_dir, step):
    """metrics.jsonl's lines (bytes) up to `step` and past it. A line that is no record of ours (a note added by
    hand, bytes that are not UTF-8) is history too: it stays. A last line a crash cut short is dropped."""
    kept = []
    past = []
    if os.path.exists(metrics_path(out_dir)):
        with open(metrics_path(out_dir), "rb") as f:
            lines = f.readlines()
    else:
        lines = []
    for i, line in enumerate(lines):
        try:
            entry = json.loads(line)
            entry_step = entry["step"] if isinstance(entry, dict) and type(entry["step"]) is int else None
        except (ValueError, KeyError):
            entry = None
            entry_step = None
        if i == len(lines) - 1 and not line.endswith(b"\n"):
            if entry is None and line.startswith(b"{"):
                continue  # torn by a crash mid-write
            line += b"\n"
        # a start or resume marked at `step` is marked anew by this run
        is_past = entry_step is not None and (entry_step > step or (entry_step == step and "event" in entry))
        (past if is_past else kept).append(line)
    return kept, past


class NoWandb:
    """wandb's stand-in when wandb_log is off: the same calls, doing nothing."""

    def log(self, fields, step):
        pass


def start_wandb(cfg, run_id, rewinding, log):
    """One wandb run per timeline: a resume continues the checkpoint's run; a fresh start or a rewind starts one."""
    try:
        import wandb
    except ImportError:
        raise ConfigError("wandb_log=True needs wandb: pip install wandb") from None
    if rewinding and run_id:
        log(f"wandb: run {run_id} keeps the abandoned steps; this timeline continues in a new run")
    try:
        return wandb.init(project=cfg["wandb_project"], name=cfg["wandb_run_name"], resume="allow", config=cfg,
                          id=run_id if run_id and not rewinding else uuid.uuid4().hex[:8])
    except Exception as e:  # not logged in, no network: wandb has many kinds of error
        raise ConfigError(f"wandb_log=True, but wandb cannot start: {type(e).__name__}: {' '.join(str(e).split())}; "
                          f"try WANDB_MODE=offline") from None


class Metrics:
    """The run's log: lines of metrics.jsonl (rank 0's file; None on the other ranks) and wandb's run (or NoWandb).
    wandb drops steps it has seen, so the steps a crash lost and this run computes again are not logged twice."""

    def __init__(self, file=None, wandb_run=None, guard=lambda: None):
        self.file = file
        self.wandb = wandb_run or NoWandb()
        self.guard = guard  # housekeeping.Guard: out_dir must still be this run's

    def record(self, step, **fields):
        if self.file is not None:  # fsynced as checkpoints are: a crash loses no line a checkpoint has
            self.guard()
            try:
                self.file.write(json.dumps({"step": step, "time": time.time(), **fields}) + "\n")
                self.file.flush()
                os.fsync(self.file.fileno())
            except OSError as e:
                raise checkpoint.CheckpointError(f"cannot write {self.file.name}: {e.strerror}") from None
        if "event" not in fields:
            self.wandb.log(fields, step=step)


def clock(seconds):
    """A duration as H:MM:SS."""
    s = max(int(seconds), 0)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Pace:
    """The loop's clock. It measures evaluations and saves as they run (timed) and takes a step's training time from
    the loop (left); an evaluation not measured yet is estimated from the step: 2 x eval_iters batches of forward
    passes, a forward pass a third of a micro-step's forward and backward. left() counts the evaluations and saves
    still due, and timed() says first what one will do when it is expected to take LONG or more."""

    LONG = 20.0  # seconds: the wait beyond which a silent terminal looks like a hang

    def __init__(self, cfg, log=print):
        self.cfg = cfg
        self.log = log
        ranks = dist.get_world_size() if dist.is_initialized() else 1
        self.micro_steps = cfg["gradient_accumulation_steps"] // ranks  # a rank's, in each step
        self.step_s = None  # seconds a step trains, as the loop last measured it
        self.took = {"eval": None, "save": None}  # seconds the last of each took

    def expected(self, what):
        """Seconds an evaluation or save is expected to take: the last one's, or for an evaluation the estimate."""
        if self.took[what] is None and what == "eval" and self.step_s is not None:
            return 2 * self.cfg["eval_iters"] * self.step_s / self.micro_steps / 3
        return self.took[what] or 0.0

    def left(self, step, step_s):
        """The time to max_iters from `step`, at step_s seconds a step, with the evaluations and saves due (at their
        intervals, and at the last step; `step`'s own too, which the loop does after it prints this), as H:MM:SS."""
        self.step_s = step_s
        end = self.cfg["max_iters"]
        seconds = (end - step) * step_s
        for what, key in (("eval", "eval_interval"), ("save", "checkpoint_interval")):
            interval = self.cfg[key]
            due = end // interval - (step - 1) // interval
            if end % interval:
                due += 1  # the last step's
            seconds += due * self.expected(what)
        return clock(seconds)

    @contextmanager
    def timed(self, what, step):
        """Time an evaluation or a save of `step`, said first when it is expected to take LONG or more; its
        duration is what the next one expects."""
        expected = self.expected(what)
        if expected >= self.LONG:
            if what == "eval":
                doing = f"estimating the train and val loss on eval_iters={self.cfg['eval_iters']} batches each"
            else:
                doing = "saving a checkpoint"
            self.log(f"step {step}: {doing}, about {clock(expected)}")
        began = time.perf_counter()
        yield
        self.took[what] = time.perf_counter() - began
