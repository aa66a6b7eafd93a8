"""
Plot a run's losses from the metrics.jsonl that train.py appends to in its out_dir:

    python plot.py out                       # writes out/loss.png
    python plot.py out --output=/tmp/run.png

Training loss is a line, evaluations are markers, a dashed gray line marks each resume, and a rewind is drawn
apart: an orange dash-dot line at the step rewound to, and the steps it abandoned as a pale gray line. The two
look alike in metrics.jsonl (each starts with a "resume" event, or "start" for a rewind to step 0); a rewind is
told by what it leaves (housekeeping.rewind): an abandoned-<time>/metrics.jsonl with the lines past its step.
Needs matplotlib (pip install matplotlib), which training does not.
"""
import glob
import json
import os
import sys

USAGE = "usage: python plot.py OUT_DIR [--output=PATH]   (default PATH: OUT_DIR/loss.png)"


LOSSES = ("loss", "train_loss", "val_loss")


class PlotError(Exception):
    """Bad input: printed as one line on stderr, exit code 2."""


def read_metrics(path):
    """(the records of a metrics.jsonl in file order, the numbers of the lines skipped). metrics.jsonl is history:
    a line that is no record (a note added by hand, bytes that are not UTF-8, a last line a crash tore) is skipped,
    never a reason to draw nothing."""
    with open(path, "rb") as f:
        data = f.read()
    lines = data.splitlines()
    records, skipped = [], []
    for i, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:  # UnicodeDecodeError too
            record = None
        numbers = isinstance(record, dict) and all(isinstance(record.get(k, 0.0), (int, float)) for k in LOSSES)
        if numbers and type(record.get("step")) is int:
            records.append(record)
        elif line.strip() and not (i == len(lines) and not data.endswith(b"\n")):  # a last line a crash tore
            skipped.append(i)
    return records, skipped


def read_rewinds(out_dir, records):
    """(the events among records, the live timeline's, that began after a rewind; the abandoned timelines, each a
    list of records). A rewind moved the lines past its step N into abandoned-<time>/metrics.jsonl, then the run
    it started logged its event at N: the first event, in time, after the last of those lines, at a step no later
    than the first of them. That event may itself lie in a timeline a later rewind abandoned."""
    abandoned = []
    for path in sorted(glob.glob(os.path.join(glob.escape(out_dir), "abandoned-*", "metrics.jsonl"))):
        try:
            abandoned.append(read_metrics(path)[0])
        except OSError:  # an abandoned timeline we cannot read is not drawn; the live one still is
            continue
    events = [r for timeline in [records, *abandoned] for r in timeline
              if r.get("event") in ("start", "resume") and isinstance(r.get("time"), (int, float))]
    live, rewinds = {id(r) for r in records}, []
    for timeline in abandoned:
        times, own = [r["time"] for r in timeline if isinstance(r.get("time"), (int, float))], set(map(id, timeline))
        first = min((r["step"] for r in timeline), default=None)
        after = [e for e in events if times and e["step"] <= first and e["time"] >= max(times) and id(e) not in own]
        event = min(after, key=lambda e: e["time"], default=None)
        if event is not None and id(event) in live and all(event is not r for r in rewinds):
            rewinds.append(event)
    return rewinds, abandoned


def loss_lines(records):
    """The training loss as stretches of (steps, losses): a step back (a resume from before the last logged step)
    starts another, so that no line is drawn back across the plot."""
    stretches = [[]]
    for r in (r for r in records if "loss" in r):
        if stretches[-1] and r["step"] <= stretches[-1][-1]["step"]:
            stretches.append([])
        stretches[-1].append(r)
    return [([r["step"] for r in s], [r["loss"] for r in s]) for s in stretches if s]


def draw(ax, records, rewinds, abandoned):
    """The run on a matplotlib Axes: the live timeline, its resumes and rewinds, and the abandoned steps."""
    for i, (steps, losses) in enumerate(line for timeline in abandoned for line in loss_lines(timeline)):
        ax.plot(steps, losses, color="0.75", lw=1, label="abandoned by a rewind" if i == 0 else None)
    for i, (steps, losses) in enumerate(loss_lines(records)):  # evaluations alone leave no training line
        ax.plot(steps, losses, color="C0", lw=1, label="train loss" if i == 0 else None)
    for key, color, marker in (("train_loss", "C2", "o"), ("val_loss", "C3", "s")):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), color=color, marker=marker, ls="none", label=f"{key.replace('_', ' ')} (eval)")
    resumes = [r for r in records if r.get("event") == "resume" and not any(r is w for w in rewinds)]
    for i, r in enumerate(resumes):
        ax.axvline(r["step"], color="gray", ls="--", lw=1, label="resumed" if i == 0 else None)
    for i, r in enumerate(rewinds):
        ax.axvline(r["step"], color="C1", ls="-.", lw=1.5, label="rewound" if i == 0 else None)


def main(argv):
    output = [a for a in argv if a.startswith("--output=")]
    rest = [a for a in argv if a not in output]
    if len(rest) != 1 or rest[0].startswith("-") or len(output) > 1 or output == ["--output="]:
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    out_dir = rest[0]
    if "://" in out_dir:  # a bucket's (objstore.py): its metrics files downloaded; the PNG lands in this folder
        import objstore
        default_output = "loss.png"
        try:
            out_dir = objstore.local_copy(out_dir, steps=[])
        except (objstore.checkpoint.CheckpointError, objstore.ConfigError) as e:
            raise PlotError(str(e)) from None
    else:
        default_output = os.path.join(out_dir, "loss.png")
    output = output[0][len("--output="):] if output else default_output
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.isdir(out_dir):
        raise PlotError(f"no folder {out_dir}")
    if not os.path.isfile(path):
        raise PlotError(f"no {path} (train.py writes it as it runs)")
    try:
        records, skipped = read_metrics(path)
    except OSError as e:
        raise PlotError(f"cannot read {path}: {e.strerror}") from None
    if skipped:
        numbers = ", ".join(map(str, skipped[:5])) + (" and more" if len(skipped) > 5 else "")
        print(f"warning: {path}: skipped {'line' if len(skipped) == 1 else 'lines'} {numbers}: not a record of "
              f"train.py's", file=sys.stderr)
    if not any(key in r for r in records for key in LOSSES):
        raise PlotError(f"no losses in {path} yet")
    try:
        import matplotlib
    except ImportError:
        raise PlotError("plot.py needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # render to a file: no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    draw(ax, records, *read_rewinds(out_dir, records))
    ax.set(xlabel="step", ylabel="loss", title=os.path.basename(os.path.abspath(out_dir)))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(output, dpi=100)
    except OSError as e:
        raise PlotError(f"cannot write {output}: {e.strerror or e}") from None
    print(f"wrote {output}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except PlotError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
