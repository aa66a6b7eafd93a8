"""
A run's life in its out_dir, apart from the checkpoint files themselves (checkpoint.py's) and its log (logs.py's):
one run per folder (an flock on train.lock, and a check that the folder is still the one locked), the step to
start from, chosen by rank 0 and told to every rank, which must all have been given the same config, what a
resume inherits from its checkpoint and a fresh start from init_from, rewinds (newer checkpoints and their
metrics set aside, in an order a kill cannot make lose anything), and the signals that stop a run, with the vote
that makes every DDP rank stop after the same step. Nothing here writes before open_out_dir, which train.py calls
once every check has passed, but the lock (train.lock, in an out_dir that exists).
"""
import fcntl
import os
import signal
import socket
import time

import torch
import torch.distributed as dist

import checkpoint
from configurator import STOP_SIGNALS, ConfigError, ScriptSignals, is_rank_0
from hf_gpt2 import GPT2_HUB_NAMES, load_hf_gpt2
from logs import Metrics, metrics_path, split_metrics, start_wandb, write_whole

RUN_KEYS = ("out_dir", "from_checkpoint_step", "init_from", "eval_only")  # this command's alone, never inherited
SHAPE_KEYS = checkpoint.SHAPE_KEYS  # the model's: a resume and init_from take them from the weights
SCHEDULE_KEYS = ("learning_rate", "warmup_iters", "lr_decay_iters", "min_lr")  # what train.py's get_lr reads
LOCK_NAME = "train.lock"


def lock(out_dir):
    """Hold out_dir for this run: an exclusive flock on out_dir/train.lock, which the kernel releases when the
    process ends, kill -9 included. Returns the open file (close it to release); CheckpointError names the
    holder when another process has it. A filesystem without locks gets a warning, not a refusal."""
    try:
        f = open(os.path.join(out_dir, LOCK_NAME), "a+")
    except OSError as e:
        raise checkpoint.CheckpointError(f"cannot open {e.filename}: {e.strerror}") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "a process that is starting"
        f.close()
        raise checkpoint.CheckpointError(f"out_dir {out_dir} is in use by another run ({holder}); "
                                         f"wait for it to end, or pass another out_dir") from None
    except OSError as e:
        print(f"warning: cannot lock {f.name} ({e.strerror}): make sure no other run uses {out_dir}")
        return f
    f.truncate(0)
    f.write(f"host {socket.gethostname()}, pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    return f


class Guard:
    """Called before each write into out_dir: CheckpointError unless out_dir/train.lock is still the file this run
    locked. A folder deleted and made anew, or a train.lock deleted or replaced, has another run's files now (or
    soon): writing or pruning there would mix two runs in one folder."""

    def __init__(self, out_dir, lock_file):
        self.out_dir, self.held, self.folder = out_dir, os.fstat(lock_file.fileno()), os.stat(out_dir)

    def foreign(self):
        """Whether the folder at out_dir's path is another than the one locked: a file written there by path
        since landed in another run's folder."""
        return not checkpoint.same_file(self.out_dir, self.folder)

    def __call__(self):
        try:
            now = os.stat(os.path.join(self.out_dir, LOCK_NAME))
        except OSError:
            now = None
        if now is None or (now.st_dev, now.st_ino) != (self.held.st_dev, self.held.st_ino):
            raise checkpoint.CheckpointError(f"out_dir {self.out_dir} is no longer the folder this run locked (it, "
                                             f"or its {LOCK_NAME}, was deleted or replaced): stopped without "
                                             f"writing there")


def resolve_start(cfg, given, ddp, master, cleanup):
    """Rank 0 locks out_dir (one run per folder; eval_only only reads) and picks the checkpoint to resume; it tells
    the other ranks, and a resume takes its config (continue_run). Returns (step, state or None, lock or None)."""
    if ddp:  # one job, one command: ranks told another max_iters would hang, another seed train two runs as one
        configs = [None] * dist.get_world_size()  # from_checkpoint_step aside: rank 0 chooses, the others follow
        dist.all_gather_object(configs, {k: v for k, v in cfg.items() if k != "from_checkpoint_step"})
        differ = [k for k in configs[0] if any(c.get(k) != configs[0][k] for c in configs)]
        if differ:
            ranks = [r for r, c in enumerate(configs) if c != configs[0]]
            raise ConfigError(f"the ranks of this job were given different configs: {', '.join(differ)} differ "
                              f"between rank 0 and rank {ranks[0]}; start every node with the same command")
    choice, state, locked = {"step": 0, "error": None}, None, None
    whole = not (ddp and cfg["fsdp"])  # a sharded run's ranks each read their shards of a folder later
    if master:
        try:
            if os.path.isdir(cfg["out_dir"]) and not cfg["eval_only"]:  # else locked when writing starts
                locked = cleanup.enter_context(lock(cfg["out_dir"]))
            # restarted by torchrun --max-restarts: the newest step, for rewinding again would undo the progress
            requested = -1 if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) else cfg["from_checkpoint_step"]
            choice["step"], state = checkpoint.find(cfg["out_dir"], requested, print, whole)
        except checkpoint.CheckpointError as e:
            choice["error"] = str(e)
    if ddp:
        envelope = [choice]
        dist.broadcast_object_list(envelope, src=0)
        choice = envelope[0]
    if choice["error"]:
        raise checkpoint.CheckpointError(choice["error"])
    step = choice["step"]
    if step and state is None:
        state = checkpoint.load(checkpoint.path_for(cfg["out_dir"], step), whole, checked=not whole)
    if state is not None:
        continue_run(cfg, given, state)
    return step, state, locked


def start_line(cfg, given, step, state, init):
    """What the run starts from; at a resume, what the command changed, each change as it acts (see no_effect)."""
    if init:
        return f"starting fresh from the weights of {init['origin']}"
    if state is None:
        nanogpt = os.path.join(cfg["out_dir"], checkpoint.NANOGPT_NAME)
        hint = f" ({nanogpt} is nanoGPT's: init_from={nanogpt} starts from it)" if os.path.isfile(nanogpt) else ""
        return "starting fresh" + (f": no checkpoint in {cfg['out_dir']}{hint}" if cfg["from_checkpoint_step"] == -1
                                   else "")
    old, ranks, changed = state["config"], dist.get_world_size() if dist.is_initialized() else 1, []
    for k in sorted(given - set(RUN_KEYS) - set(SHAPE_KEYS)):  # the model's shape cannot change: continue_run
        new = (cfg[k] or ranks) if k == "gradient_accumulation_steps" else cfg[k]  # 0: one micro-batch a rank
        if k in old and old[k] != new:
            why = f"0: one micro-batch a rank, {new}" if new != cfg[k] else no_effect(k, cfg, old, step)
            changed.append(f"{k}: {old[k]!r} -> {cfg[k]!r}" + (f" ({why})" if why else ""))
    return (f"{'evaluating' if cfg['eval_only'] else 'resuming from'} step {step}"
            + (f"; changed by this command: {'; '.join(changed)}" if changed else "")
            + (f"\ninit_from applies to a fresh start only: this run resumes its own step {step}"
               if "init_from" in given else ""))


def no_effect(key, cfg, old, step):
    """Why changing `key` moves no learning rate of a step left (from `step` on) in train.py's get_lr, or None."""
    if not cfg["decay_lr"]:
        return "no effect: decay_lr=False keeps learning_rate" if key in SCHEDULE_KEYS[1:] else None
    if key in SCHEDULE_KEYS[:3] and step >= max(cfg["lr_decay_iters"], 0 if key == "learning_rate" else old[key]):
        return f"no effect: step {step} is past lr_decay_iters, where the learning rate stays min_lr={cfg['min_lr']}"


def check_out_dir(cfg):
    """The keys that pick the run and its checkpoint, checked first, since the others may come from it: out_dir
    must be a folder this process can write in, or creatable (nothing is created here)."""
    if not cfg["out_dir"]:
        raise ConfigError("out_dir must not be empty")
    if cfg["from_checkpoint_step"] < -1:
        raise ConfigError(f"from_checkpoint_step must be -1 (newest), 0 (fresh) or a step, "
                          f"got {cfg['from_checkpoint_step']}")
    path = os.path.abspath(cfg["out_dir"])
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise ConfigError(f"out_dir {cfg['out_dir']}: {path} is not a folder")
    if not cfg["eval_only"] and not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"out_dir {cfg['out_dir']}: {path} is not writable")


def continue_run(cfg, given, state):
    """A resume continues the same run: every key but RUN_KEYS comes from the checkpoint's config unless this
    command sets it, and the model has the checkpoint's shape. Updates cfg; start_line says what changed."""
    missing = [key for key in ("optimizer", "config") if not isinstance(state.get(key), dict)]
    if missing:
        raise checkpoint.CheckpointError(f"checkpoint step {state['step']} has weights but no {' or '.join(missing)}"
                                         f": it cannot be resumed; init_from=<the file> starts a run from its weights")
    cfg |= {k: v for k, v in state["config"].items() if k in cfg and k not in given and k not in RUN_KEYS}
    for group, name in zip(state["optimizer"]["param_groups"], ("decay", "no_decay")):  # groups got names later
        group.setdefault("name", name)
    for key in SHAPE_KEYS:
        if key in given and cfg[key] != state["model_args"][key]:
            raise ConfigError(f"{key}={cfg[key]!r} contradicts checkpoint step {state['step']}, whose model has "
                              f"{key}={state['model_args'][key]!r}: for a new run, pass another --out_dir (or "
                              f"--from_checkpoint_step=0 to start over here)")
        cfg[key] = state["model_args"][key]


def init_weights(cfg, given):
    """A fresh start's weights, init_from: GPT-2's released ones (a hub name or a Hugging Face folder) or another
    run's checkpoint (a file, or an out_dir with an optional :step). The model takes their shape where this command
    does not set it, and a smaller block_size crops the position table. Returns a dict: model_args, weights,
    origin (a description) and vocab; None for scratch (or 'resume', nanoGPT's word for it)."""
    source = cfg["init_from"]
    if source in ("scratch", "resume"):
        return None
    if source in GPT2_HUB_NAMES or os.path.isfile(os.path.join(source, "config.json")):
        try:
            model_args, weights = load_hf_gpt2(source)
        except (ValueError, OSError, ImportError) as e:  # PretrainedError is a ValueError
            raise ConfigError(f"init_from={source}: {e}") from None
        init = {"model_args": model_args, "weights": weights, "origin": f"Hugging Face GPT-2 {source}",
                "vocab": {"tokenizer": "gpt2"}}
    else:
        folder, colon, step = source.rpartition(":")
        if not (colon and step.isdigit()):
            folder, step = source, "-1"
        if os.path.isfile(source):
            state = checkpoint.load(source)
        elif os.path.isdir(folder):
            state = checkpoint.find(folder, int(step), warn=print)[1]
            nanogpt = os.path.join(folder, checkpoint.NANOGPT_NAME)
            if state is None and os.path.isfile(nanogpt):  # a nanoGPT out_dir: its one checkpoint
                state = checkpoint.load(nanogpt)
            if state is None:
                raise ConfigError(f"init_from={source}: no checkpoint in {folder}")
        else:
            raise ConfigError(f"init_from={source}: not scratch, {', '.join(GPT2_HUB_NAMES)}, a Hugging Face GPT-2 "
                              f"folder, or a checkpoint file or out_dir")
        whose = f"{state['origin']}'s " if state.get("origin") == "nanoGPT" else ""
        init = {"model_args": state["model_args"], "weights": state["model"],
                "origin": f"{source} ({whose}step {state['step']})", "vocab": state["meta"]}
    for key in SHAPE_KEYS:
        theirs = init["model_args"][key]
        if key in given and cfg[key] != theirs and not (key == "block_size" and cfg[key] < theirs):
            raise ConfigError(f"{key}={cfg[key]!r} contradicts init_from's model, which has {key}={theirs!r}")
        if key not in given:
            cfg[key] = theirs
    # a smaller block_size (fine-tuning GPT-2's 1024 on 256, say) keeps the first rows of the position table
    init["weights"]["transformer.wpe.weight"] = init["weights"]["transformer.wpe.weight"][:cfg["block_size"]]
    return init


def rewind(out_dir, step):
    """Make out_dir hold the timeline up to `step` alone, in an order that a kill at any moment cannot make lose
    anything, and that a rerun completes: (1) a new folder abandoned-<time>/ gets the metrics lines past step,
    written whole; (2) the newer checkpoints move into it; (3) metrics.jsonl keeps the lines up to step, written
    whole. With no newer checkpoint only (3) runs: lines past step are then of steps a crash lost, which this run
    computes again. Returns the abandoned folder, or None."""
    newer = [s for s in checkpoint.list_steps(out_dir) if s > step]
    kept, past = split_metrics(out_dir, step)
    folder = None
    if newer:
        stamp = time.strftime("abandoned-%Y%m%d-%H%M%S")
        folder, n = os.path.join(out_dir, stamp), 1
        while os.path.exists(folder):  # two rewinds within one second
            n += 1
            folder = os.path.join(out_dir, f"{stamp}-{n}")
        os.makedirs(folder)
        write_whole(metrics_path(folder), past)
        for s in newer:
            name = os.path.basename(checkpoint.path_for(out_dir, s))
            os.replace(os.path.join(out_dir, name), os.path.join(folder, name))
        checkpoint.fsync_dir(out_dir)
    if past or os.path.exists(metrics_path(out_dir)):
        write_whole(metrics_path(out_dir), kept)
    return folder


def clean_leftovers(out_dir):
    """Delete what a crash left: half-written checkpoints and metrics files, a rewind's folder it never filled. A
    folder holding a complete metrics.jsonl stays, even one a rewind killed before its moves (its lines are then
    copies: losing nothing matters more)."""
    checkpoint.remove_temporaries(out_dir)
    for folder in [out_dir] + [os.path.join(out_dir, n) for n in os.listdir(out_dir) if n.startswith("abandoned-")]:
        if os.path.exists(metrics_path(folder) + ".tmp"):
            os.remove(metrics_path(folder) + ".tmp")
        if folder != out_dir and os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)


def open_out_dir(cfg, step, locked, loop, cleanup, log):
    """Rank 0, once every check has passed: start wandb when it is on (it may fail: before anything on disk
    changes; loop["wandb_run_id"] becomes its run's), lock a new out_dir, clean what a crash left, rewind to
    `step`. Returns the run's Metrics and the Guard that every later write checks first."""
    out_dir = cfg["out_dir"]
    rewinding = any(s > step for s in checkpoint.list_steps(out_dir))
    wandb_run = start_wandb(cfg, loop["wandb_run_id"], rewinding, log) if cfg["wandb_log"] else None
    if wandb_run is not None:
        cleanup.callback(wandb_run.finish)
        loop["wandb_run_id"] = wandb_run.id
    try:
        if locked is None:  # a new out_dir: lock it, and make sure no other run got there first
            os.makedirs(out_dir, exist_ok=True)
            locked = cleanup.enter_context(lock(out_dir))
            if checkpoint.list_steps(out_dir):
                raise checkpoint.CheckpointError(f"out_dir {out_dir} got checkpoints from another run meanwhile")
        clean_leftovers(out_dir)
        abandoned = rewind(out_dir, step)
        metrics_file = cleanup.enter_context(open(metrics_path(out_dir), "a"))
    except OSError as e:
        raise checkpoint.CheckpointError(f"cannot prepare out_dir: {e.filename}: {e.strerror}") from None
    if abandoned:
        log(f"rewinding to step {step}: moved the newer checkpoints into {abandoned}")
    guard = Guard(out_dir, locked)
    return Metrics(metrics_file, wandb_run, guard), guard


def finished(cfg, step):
    """The last line of a run that reached max_iters: what it did, and what to do next."""
    out = cfg["out_dir"]
    return (f"done: trained to step {step} (max_iters); next: python sample.py --out_dir={out}, python plot.py "
            f"{out}, or train on with --max_iters=<more> (lr_decay_iters too, for the schedule to stretch)")


class StopSignals:
    """SIGTERM, SIGUSR1 (what schedulers send before taking the machine) and Ctrl-C ask the loop to save its step and
    end. A second Ctrl-C a second later (torchrun passes each one on to workers the terminal sent it to) stops at once,
    exit 130, cancelling the final save (a stop's or max_iters'), unless that is on disk: then the run ends as a stop
    that saved, exit 0. Under DDP the ranks vote to stop after the same step. Leaving restores the handlers it
    replaced, or in a script (run_main's ScriptSignals) ignores the signals: the exit code is decided then."""

    def __init__(self, ddp, cfg):  # cfg's out_dir and max_iters are read at the end
        self.ddp, self.cfg, self.received, self.final, self.ending, self.noted = ddp, cfg, [], None, False, False
        rewinds, self.speak = cfg["from_checkpoint_step"] != -1, is_rank_0()
        self.rerun = "it without --from_checkpoint_step, which would rewind again," if rewinds else "the same command"
        self.interrupted = (f"interrupted: stopped at once, without saving the current step; "
                            f"rerun {self.rerun} to resume")
        self.flag, self.pending = torch.zeros(1, dtype=torch.int32), None

    def saved(self):  # the final checkpoint under its final name: complete
        return self.final is not None and os.path.exists(checkpoint.path_for(self.cfg["out_dir"], self.final))

    def on_signal(self, signum, frame):
        now = time.monotonic()
        again = signum == signal.SIGINT and any(s == signum and now - t > 1.0 for s, t in self.received)
        self.received.append((signum, now))
        if again and not self.ending:  # leaving, the outcome is decided whatever it is
            if not self.saved():
                raise KeyboardInterrupt(self.interrupted)
            if self.speak and not self.noted:  # os.write: a print could land inside one of the loop's prints
                self.noted = os.write(2, f"step {self.final} is saved: ending; a signal changes nothing\n".encode())

    def __enter__(self):
        self.previous = {sig: signal.signal(sig, self.on_signal) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, kind, error, traceback):
        self.ending = True
        for sig, handler in self.previous.items():
            signal.signal(sig, signal.SIG_IGN if isinstance(handler, ScriptSignals) else handler)
        late = kind is KeyboardInterrupt and self.saved()  # the Saver's cancel came once the file was complete
        if late and self.speak:
            print(f"stopped after step {self.final}, saved before Ctrl-C could cancel it; rerun {self.rerun} to resume")
        return late  # True suppresses the KeyboardInterrupt: the run ends as the stop that saved, exit 0

    def vote(self):
        """Start the ranks' vote (an all-reduce of 'has any rank been signalled?'); it runs while the step computes."""
        if self.ddp:
            self.flag.fill_(1 if self.received else 0)
            self.pending = dist.all_reduce(self.flag, op=dist.ReduceOp.MAX, async_op=True)

    def agreed(self, step):
        """Whether to stop after `step`, the step just done: the vote's outcome, the same on every rank."""
        if self.ddp:
            self.pending.wait()
        stop = bool(self.flag.item()) if self.ddp else bool(self.received)
        if stop or step >= self.cfg["max_iters"]:  # the last step: what remains is its save
            self.final = step
        return stop
