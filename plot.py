"""
Plot a run's losses from the metrics.jsonl that train.py appends to in its out_dir:

    python plot.py out                       # writes out/loss.png
    python plot.py out --output=/tmp/run.png

Training loss is a line, evaluations are markers, and a dashed line marks each resume.
Needs matplotlib (pip install matplotlib), which training does not.
"""
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


def main(argv):
    output = [a for a in argv if a.startswith("--output=")]
    rest = [a for a in argv if a not in output]
    if len(rest) != 1 or rest[0].startswith("-") or len(output) > 1 or output == ["--output="]:
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    out_dir = rest[0]
    output = output[0][len("--output="):] if output else os.path.join(out_dir, "loss.png")
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.isdir(out_dir):
        raise PlotError(f"no folder {out_dir}")
    if not os.path.isfile(path):
        raise PlotError(f"no {path} (train.py writes it as it runs)")
    records, skipped = read_metrics(path)
    if skipped:
        print(f"warning: {path}: skipped line{'s' * (len(skipped) > 1)} {', '.join(map(str, skipped[:5]))}"
              f"{' and more' if len(skipped) > 5 else ''}: not a record of train.py's", file=sys.stderr)
    if not any(key in r for r in records for key in LOSSES):
        raise PlotError(f"no losses in {path} yet")
    try:
        import matplotlib
    except ImportError:
        raise PlotError("plot.py needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # render to a file: no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    stretches = [[]]
    for r in (r for r in records if "loss" in r):
        if stretches[-1] and r["step"] <= stretches[-1][-1]["step"]:
            stretches.append([])  # a resume from before the last logged step: start over there, don't draw a line back
        stretches[-1].append(r)
    for i, stretch in enumerate(s for s in stretches if s):  # evaluations alone leave no training line
        ax.plot([r["step"] for r in stretch], [r["loss"] for r in stretch], color="C0", lw=1,
                label="train loss" if i == 0 else None)
    for key, color, marker in (("train_loss", "C2", "o"), ("val_loss", "C3", "s")):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), color=color, marker=marker, ls="none", label=f"{key.replace('_', ' ')} (eval)")
    for i, r in enumerate(r for r in records if r.get("event") == "resume"):
        ax.axvline(r["step"], color="gray", ls="--", lw=1, label="resumed" if i == 0 else None)
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
