"""
A run's checkpoints and its life in out_dir: all that train.py asks of them, in a handful of places.

    with outdir.Run(cfg, given) as run:         # stop signals handled from here on; the job's ranks joined
        resumed = run.resume()                  # the checkpoint to resume (its config merged into cfg), or None
        init = run.init_weights()               # a fresh start's weights (init_from), or None
        load_weights(model, ...); load_optimizer(optimizer, scaler, resumed)
        run.open()                              # every check has passed: only now is out_dir written
        while ...:
            run.log(step, loss=...)             # a line of metrics.jsonl, and of wandb
            run.save(state)                     # a checkpoint, written in the background
            if run.should_stop(step): break     # a signal: every rank stops after the same step
        run.finish(step)                        # the last checkpoint is on disk

The promises behind it: every rank resumes the step rank 0 chose, in a folder one run holds at a time; a resume
continues the same run (every key this command does not set comes from the checkpoint); a checkpoint the code can
no longer load is one line that names the difference; nothing is written before open(), but train.lock; a save is
complete or absent, and a failed one stops the run at the next step; a signal saves the step and exits 0.

Behind it: checkpoint.py (the files), saver.py (the background writer), housekeeping.py (the lock, the guard,
rewinds), logs.py (metrics), stops.py (signals and exit codes), sharded.py (FSDP2 folders), device.py (the job),
and for out_dir=s3://bucket/prefix remote.py (a local staging folder mirrored to the bucket; objstore.py).
"""
import os
from contextlib import ExitStack, contextmanager

import torch.distributed as dist

import checkpoint
import housekeeping
import objstore
import remote
from configurator import ConfigError
from device import join_job
from hf_gpt2 import GPT2_HUB_NAMES, load_hf_gpt2
from logs import Metrics, Pace, metrics_path, start_wandb
from model import SHAPE_KEYS, is_shard
from saver import Saver
from stops import StopSignals

RUN_KEYS = ("out_dir", "from_checkpoint_step", "init_from", "eval_only")  # this command's alone, never inherited
NEW_RUN = "for a new run, pass another --out_dir (or --from_checkpoint_step=0 to start over here)"


class Run:
    """One run of train.py, from its first line to its last: see the module's docstring."""

    def __init__(self, cfg, given):
        self.cfg = cfg
        self.given = given
        self.ddp = "RANK" in os.environ  # started by torchrun
        self.master = not self.ddp or int(os.environ["RANK"]) == 0  # rank 0 alone writes out_dir
        self.cleanup = ExitStack()  # whatever ends the run, an error or Ctrl-C too, undoes what it set up
        self.start_step = 0
        # where the run's files are written: out_dir itself, or for a bucket's URL a local staging folder that
        # the mirror (remote.py, rank 0's) uploads in the background
        self.out_dir = cfg["out_dir"]
        self.mirror = None
        self.lock_file = None
        self.resumed_config = None
        # the run's own records, kept in every checkpoint: where step 0's weights came from, the step with the
        # best val loss, wandb's run
        self.records = {"origin": "scratch", "best_checkpoint": None, "wandb_run_id": None}
        self.metrics = Metrics()
        self.saver = None
        self.pace = None

    def __enter__(self):
        try:
            # first: a signal during start-up asks the run to stop after its first step, never cuts start-up short
            self.stops = self.cleanup.enter_context(StopSignals(self.cfg, self.ddp))
            if self.ddp:  # gloo carries control messages; each start of the job gets a store prefix of its own
                self.cleanup.enter_context(join_job())
        except BaseException:
            self.cleanup.close()
            raise
        return self

    def __exit__(self, kind, error, traceback):
        return self.cleanup.__exit__(kind, error, traceback)

    @property
    def sharded(self):
        """Whether the ranks shard the model (FSDP2): fsdp=True under torchrun, once a resume has merged its
        config. On one process fsdp changes nothing: there is nothing to shard."""
        return self.ddp and self.cfg["fsdp"]

    def print(self, line):
        if self.master:
            print(line)

    def resume(self):
        """Choose the step to start from and return its checkpoint's state, or None for a fresh start. Rank 0
        locks out_dir and chooses: the newest good checkpoint (from_checkpoint_step=-1), exactly step N, or none
        (0); every rank gets the same step, and must have been given the same config. A resume continues the same
        run: every key but RUN_KEYS that this command does not set comes from the checkpoint's config (cfg is
        updated), and a key of the model's shape may not contradict it."""
        cfg = self.cfg
        if cfg["from_checkpoint_step"] < -1:
            raise ConfigError(f"from_checkpoint_step must be -1 (newest), 0 (fresh) or a step, "
                              f"got {cfg['from_checkpoint_step']}")
        if objstore.is_remote(cfg["out_dir"]):
            objstore.Store(cfg["out_dir"])  # a malformed URL, or boto3 missing: one line, before anything
            self.out_dir = objstore.staging_dir(cfg["out_dir"])
            self.stops.out_dir = self.out_dir
        else:
            housekeeping.check_out_dir(cfg)
        if self.ddp:
            check_one_config(cfg)
        # a sharded run's ranks each read their shards of a folder later, in load_optimizer
        whole = not self.sharded
        choice = {"step": 0, "error": None}
        state = None
        if self.master:
            try:
                choice["step"], state = self.choose_checkpoint(whole)
            except checkpoint.CheckpointError as e:
                choice["error"] = str(e)
        if self.ddp:  # rank 0's choice, or its error, for every rank
            envelope = [choice]
            dist.broadcast_object_list(envelope, src=0)
            choice = envelope[0]
        if choice["error"]:
            raise checkpoint.CheckpointError(choice["error"])
        self.start_step = choice["step"]
        if self.start_step and state is None:  # another rank: rank 0 has checked every file's CRC32
            path = checkpoint.path_for(self.out_dir, self.start_step)
            state = checkpoint.load(path, whole, checked=not whole)
        if state is not None:
            continue_run(cfg, self.given, state)
            self.resumed_config = dict(state["config"])
            for key in self.records:
                self.records[key] = state.get(key, self.records[key])
        return state

    def choose_checkpoint(self, whole):
        """Rank 0: lock out_dir (eval_only only reads it) and find the checkpoint to resume. For a bucket's URL,
        the prefix is locked first, and the step to resume downloaded into the staging folder (remote.py)."""
        cfg = self.cfg
        requested = cfg["from_checkpoint_step"]
        # restarted by torchrun --max-restarts: the newest step, for rewinding again would undo the progress
        if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)):
            requested = -1
        if objstore.is_remote(cfg["out_dir"]):
            if cfg["eval_only"]:  # a reader's: the live run's staging folder is never touched
                return objstore.find_to_read(cfg["out_dir"], requested, "evaluate", print)
            self.mirror = self.cleanup.enter_context(remote.Mirror(cfg["out_dir"], cfg["keep_last_checkpoints"],
                                                                   cfg["keep_every"], print))
            requested = self.mirror.prepare(requested, print)[1]  # 0: nothing to resume there
        if os.path.isdir(self.out_dir) and not cfg["eval_only"]:  # a new out_dir is locked as it is made
            self.lock_file = self.cleanup.enter_context(closed_at_exit(housekeeping.lock(self.out_dir)))
        return checkpoint.find(self.out_dir, requested, print, whole)

    def init_weights(self):
        """A fresh start's weights, from init_from (see init_weights); None at a resume or for scratch."""
        if self.resumed_config is not None:
            return None
        init = init_weights(self.cfg, self.given)
        if init is not None:
            self.records["origin"] = init["origin"]
        return init

    def start_line(self, get_lr):
        """What the run starts from, said once every check has passed; at a resume, what this command changed,
        each change as it acts (get_lr, train.py's schedule, tells whether a change moves any learning rate)."""
        cfg = self.cfg
        if self.resumed_config is None:
            if self.records["origin"] != "scratch":
                return f"starting fresh from the weights of {self.records['origin']}"
            if cfg["from_checkpoint_step"] == 0:
                return "starting fresh"
            nanogpt = os.path.join(cfg["out_dir"], checkpoint.NANOGPT_NAME)
            if os.path.isfile(nanogpt):
                return f"starting fresh: no checkpoint of ours in {cfg['out_dir']} ({nanogpt} is nanoGPT's: " \
                       f"init_from={nanogpt} starts from it)"
            return f"starting fresh: no checkpoint in {cfg['out_dir']}"
        verb = "evaluating" if cfg["eval_only"] else "resuming from"
        line = f"{verb} step {self.start_step}"
        changes = changed_keys(cfg, self.given, self.resumed_config, self.start_step, get_lr)
        if changes:
            line += f"; changed by this command: {'; '.join(changes)}"
        if "init_from" in self.given:
            line += f"\ninit_from applies to a fresh start only: this run resumes its own step {self.start_step}"
        return line

    def open(self):
        """Every check has passed: rank 0 starts wandb when it is on (it may fail: before anything on disk
        changes), locks a new out_dir, cleans what a crash left and rewinds to the start step; then the saver
        starts."""
        if self.master:
            self.metrics = self.open_out_dir()
        guard = self.metrics.guard
        # whatever ends the run waits for the save in flight (entered last, so it is left first)
        published = self.mirror.published if self.mirror else None  # uploaded next, in the background
        self.saver = self.cleanup.enter_context(Saver(self.out_dir, self.cfg, guard, self.print, self.sharded,
                                                      self.master, published))
        self.pace = Pace(self.cfg, self.print)
        self.stops.vote()  # the ranks' vote on stopping after the first step, while it computes

    def open_out_dir(self):
        """Rank 0's part of open(): returns the run's Metrics, whose guard every later write checks first."""
        out_dir = self.out_dir
        rewinding = any(s > self.start_step for s in checkpoint.list_steps(out_dir))
        if self.mirror:  # the bucket may hold newer steps than the disk
            rewinding = rewinding or self.mirror.rewinding(self.start_step)
        wandb_run = None
        if self.cfg["wandb_log"]:
            wandb_run = start_wandb(self.cfg, self.records["wandb_run_id"], rewinding, self.print)
            self.cleanup.callback(wandb_run.finish)
            self.records["wandb_run_id"] = wandb_run.id
        try:
            if self.lock_file is None:  # a new out_dir: lock it, and make sure no other run got there first
                os.makedirs(out_dir, exist_ok=True)
                self.lock_file = self.cleanup.enter_context(closed_at_exit(housekeeping.lock(out_dir)))
                if checkpoint.list_steps(out_dir):
                    raise checkpoint.CheckpointError(f"out_dir {out_dir} got checkpoints from another run "
                                                     f"meanwhile")
            housekeeping.clean_leftovers(out_dir)
            abandoned = housekeeping.rewind(out_dir, self.start_step)
            metrics_file = self.cleanup.enter_context(closed_at_exit(open(metrics_path(out_dir), "a")))
            guard = housekeeping.Guard(out_dir, self.lock_file)
        except OSError as e:
            raise checkpoint.CheckpointError(f"cannot prepare out_dir: {e.filename or out_dir}: {e.strerror}") from None
        if abandoned:
            self.print(f"rewinding to step {self.start_step}: moved the newer checkpoints into {abandoned}")
        if self.mirror:
            self.mirror.opened(self.start_step, abandoned, [self.start_step])
            self.print(f"out_dir {self.cfg['out_dir']}: checkpoints are written to {out_dir}, then uploaded "
                       f"in the background")
        metrics = Metrics(metrics_file, wandb_run, guard)
        metrics.record(self.start_step, event="resume" if self.start_step else "start")
        return metrics

    def log(self, step, **fields):
        """A line of metrics.jsonl (fsynced: a crash loses no line a checkpoint has) and of wandb, on rank 0."""
        self.metrics.record(step, **fields)
        if self.mirror:
            self.mirror.metrics_changed()

    def timed(self, what, step):
        """with run.timed("eval", step): the time left counts what it measures, and says first what it will do
        when that is expected to take long."""
        return self.pace.timed(what, step)

    def time_left(self, step, step_s):
        """The time to max_iters, at step_s seconds a step, the evaluations and saves still due counted."""
        return self.pace.left(step, step_s)

    def save(self, state):
        """Checkpoint state["step"]: a copy to host memory now, the writing in the background (async_checkpoint),
        then retention, which never deletes the step resumed from or (keep_best) the best val loss's. A failed
        save stops the run at the next should_stop."""
        step = state["step"]
        best = self.records["best_checkpoint"]
        val_loss = state.get("val_loss")
        if val_loss is not None and (best is None or val_loss < best[0]):
            self.records["best_checkpoint"] = [val_loss, step]
        protect = [self.start_step]
        if self.cfg["keep_best"] and self.records["best_checkpoint"]:
            protect.append(self.records["best_checkpoint"][1])
        with self.pace.timed("save", step):
            self.saver.save(state | self.records, protect)

    def should_stop(self, step):
        """Whether to stop after `step`, the step just done: a signal (SIGTERM, SIGUSR1, Ctrl-C) has asked, on
        any rank; every rank gets the same answer. Raises the error of a save that failed in the background."""
        self.saver.poll()
        if self.mirror:  # a store that stays unreachable stops the run here, in one line
            self.mirror.check()
        stop = self.stops.agreed(step)
        self.stops.vote()  # the vote on the next step runs while it computes
        if stop:
            self.print(f"stopped by a signal after step {step}; rerun {self.stops.rerun()} to resume")
        return stop

    def finish(self, step):
        """The run's end: the last checkpoint is on disk, and the ranks leave together."""
        self.saver.finish()
        if step == self.cfg["max_iters"]:
            out = self.cfg["out_dir"]
            self.print(f"done: trained to step {step} (max_iters); next: python sample.py --out_dir={out}, "
                       f"python plot.py {out}, or train on with --max_iters=<more> (lr_decay_iters too, for the "
                       f"schedule to stretch)")
        if self.ddp:  # a rank tearing gloo down while rank 0 still saved was once seen to abort
            dist.barrier()


def check_one_config(cfg):
    """One job, one command: ranks told another max_iters would hang, another seed would train two runs as one.
    from_checkpoint_step aside: rank 0 chooses the step, the others follow."""
    configs = [None] * dist.get_world_size()
    dist.all_gather_object(configs, {k: v for k, v in cfg.items() if k != "from_checkpoint_step"})
    differ = [k for k in configs[0] if any(c.get(k) != configs[0][k] for c in configs)]
    if differ:
        rank = next(r for r, c in enumerate(configs) if c != configs[0])
        raise ConfigError(f"the ranks of this job were given different configs: {', '.join(differ)} differ "
                          f"between rank 0 and rank {rank}; start every node with the same command")


def continue_run(cfg, given, state):
    """A resume continues the same run: every key but RUN_KEYS comes from the checkpoint's config unless this
    command sets it, and the model has the checkpoint's shape. Updates cfg."""
    step = state["step"]
    missing = [key for key in ("optimizer", "config") if not isinstance(state.get(key), dict)]
    if missing:
        raise checkpoint.CheckpointError(f"checkpoint step {step} has weights but no {' or '.join(missing)}: it "
                                         f"cannot be resumed; init_from=<the file> starts a run from its weights")
    for key, value in state["config"].items():
        if key in cfg and key not in given and key not in RUN_KEYS:
            cfg[key] = value
    for key in SHAPE_KEYS:
        saved = state["model_args"][key]
        if key in given and cfg[key] != saved:
            raise ConfigError(f"{key}={cfg[key]!r} contradicts checkpoint step {step}, whose model has "
                              f"{key}={saved!r}: {NEW_RUN}")
        cfg[key] = saved


def changed_keys(cfg, given, old, step, get_lr):
    """'key: old -> new' for each key this command set to another value than the checkpoint's config holds,
    with a note where it moves no learning rate of a step left; a key the checkpoint predates is a change too."""
    changes = []
    for key in sorted(given - set(RUN_KEYS) - set(SHAPE_KEYS)):
        if key not in old:
            changes.append(f"{key}: (not in the checkpoint) -> {cfg[key]!r}")
            continue
        if old[key] == cfg[key]:
            continue
        change = f"{key}: {old[key]!r} -> {cfg[key]!r}"
        if moves_no_rate(get_lr, cfg, key, old[key], step):
            change += " (no effect: the learning rate of every step left is the same)"
        changes.append(change)
    return changes


def moves_no_rate(get_lr, cfg, key, old_value, step):
    """Whether get_lr, with the rest of the config as it is now, gives every step from `step` to max_iters the
    same rate with key's old value as with its new one. A key get_lr reads at no step of the run is none of its
    business: False, so that nothing is said of it."""
    reads = set()

    class Reading(dict):  # the config, noting each key get_lr reads
        def __getitem__(self, name):
            reads.add(name)
            return dict.__getitem__(self, name)

    for s in range(cfg["max_iters"]):
        get_lr(s, Reading(cfg))
    steps_left = range(step, cfg["max_iters"])
    before = [get_lr(s, cfg | {key: old_value}) for s in steps_left]
    after = [get_lr(s, cfg) for s in steps_left]
    return key in reads and before == after


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
        state = read_init_checkpoint(source)
        whose = ""
        if state.get("origin") == "nanoGPT":
            whose = "nanoGPT's "
        init = {"model_args": state["model_args"], "weights": state["model"],
                "origin": f"{source} ({whose}step {state['step']})", "vocab": state["meta"]}
    for key in SHAPE_KEYS:
        theirs = init["model_args"][key]
        if key in given and cfg[key] != theirs and not (key == "block_size" and cfg[key] < theirs):
            raise ConfigError(f"{key}={cfg[key]!r} contradicts init_from's model, which has {key}={theirs!r}")
        if key not in given:
            cfg[key] = theirs
    # a smaller block_size (fine-tuning GPT-2's 1024 on 256, say) keeps the first rows of the position table
    positions = init["weights"].get("transformer.wpe.weight")
    if positions is not None:
        init["weights"]["transformer.wpe.weight"] = positions[:cfg["block_size"]]
    return init


def read_init_checkpoint(source):
    """The checkpoint init_from names: a file, or an out_dir with an optional :step (its newest good one, or
    nanoGPT's ckpt.pt in a nanoGPT out_dir)."""
    if os.path.isfile(source):
        return checkpoint.load(source)
    out_dir, colon, step = source.rpartition(":")
    if not (colon and step.isdigit()):
        out_dir = source
        step = "-1"
    if not os.path.isdir(out_dir):
        raise ConfigError(f"init_from={source}: not scratch, {', '.join(GPT2_HUB_NAMES)}, a Hugging Face GPT-2 "
                          f"folder, or a checkpoint file or out_dir")
    state = checkpoint.find(out_dir, int(step), warn=print)[1]
    nanogpt = os.path.join(out_dir, checkpoint.NANOGPT_NAME)
    if state is None and os.path.isfile(nanogpt):
        state = checkpoint.load(nanogpt)
    if state is None:
        raise ConfigError(f"init_from={source}: no checkpoint in {out_dir}")
    return state


def load_weights(model, weights, source):
    """Load `weights` into model, first checking that they fit it: names and shapes. Weights that do not fit (a
    fork changed the model since) are one line that names the difference and the ways on. source: "resume" or
    init_from's description."""
    misfit = checkpoint.misfit(model.state_dict(), weights)
    if misfit is None:
        model.load_state_dict(weights)
        return
    if source == "resume":
        raise checkpoint.CheckpointError(f"the checkpoint's weights do not fit this code's model ({misfit}): "
                                         f"{NEW_RUN}")
    raise ConfigError(f"init_from={source}: its weights do not fit this code's model ({misfit})")


def load_optimizer(model, optimizer, scaler, state):
    """A resume's optimizer state (and float16's loss scale) into the fresh optimizer, once the model is built
    (and sharded). An optimizer of another kind than the checkpoint's (a fork changed it since) is one line that
    names both, and the ways on; nothing is loaded."""
    saved = state["optimizer"]
    step = state["step"]
    sharded_model = any(is_shard(p) for p in model.parameters())
    if "shards" in state or sharded_model:
        import sharded  # a sharded run's alone: DCP's modules take seconds to import
    if "shards" in state:  # a folder: its weights are read below, with the optimizer's state
        with reading(state["shards"]):
            misfit = checkpoint.misfit(model.state_dict(), sharded.saved_weights(state["shards"]))
        if misfit is not None:
            raise checkpoint.CheckpointError(f"checkpoint step {step}'s weights do not fit this code's model "
                                             f"({misfit}): {NEW_RUN}")
    # checkpoints written before the optimizer's class was recorded are AdamW's, the one this trainer had
    saved_kind = state.get("optimizer_class", "AdamW")
    kind = type(optimizer).__name__
    for group, name in zip(saved["param_groups"], ("decay", "no_decay")):  # groups got names later
        group.setdefault("name", name)
    if saved_kind != kind:
        problem = f"it was written by {saved_kind}, this code makes {kind}"
    else:
        problem = checkpoint.groups_misfit(optimizer.param_groups, saved["param_groups"])
    if problem is not None:
        raise checkpoint.CheckpointError(f"checkpoint step {step}'s optimizer state does not fit this code's "
                                         f"optimizer ({problem}): {NEW_RUN}, or init_from=<the checkpoint> for "
                                         f"its weights alone, with a fresh optimizer")
    if "shards" in state:  # a folder: each rank reads its shards of every tensor
        with reading(state["shards"]):
            sharded.load_shards(model, optimizer, state["shards"], saved["param_groups"])
    elif sharded_model:  # a file's whole state: each rank keeps its shard of every tensor
        sharded.load_whole_optimizer(optimizer, saved)
    else:
        optimizer.load_state_dict(saved)
    if scaler.is_enabled() and state.get("scaler"):  # a switch to float16 starts a new scale
        scaler.load_state_dict(state["scaler"])


@contextmanager
def reading(folder):
    """The ranks reading a folder's shards: a disk's error is one line, as checkpoint.load says it."""
    try:
        yield
    except OSError as e:
        raise checkpoint.CheckpointError(f"cannot read checkpoint {e.filename or folder}: {e.strerror}") from None


@contextmanager
def closed_at_exit(f):
    """f (train.lock, metrics.jsonl), closed as the run ends. Each line of metrics.jsonl was fsynced as it was
    written, and the lock's line is only for a reader's eyes: an error closing them (EIO) loses nothing."""
    try:
        yield f
    finally:
        try:
            f.close()
        except OSError:
            pass
