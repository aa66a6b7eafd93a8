"""
The scripts beside train.py, and a nanoGPT user's habits with them, each a test on tiny models on the CPU:
sample.py from any step or init_from, the out_dir a command meant, plot.py (a torn line, a rewind told from a
resume), and the docs' commands sampling the folder they train into.
    python3 -m pytest -q -n 2 test_scripts.py
"""
import glob
import json
import math
import os
import re
import subprocess
import sys

import pytest

import checkpoint
import export
import plot
import sample
from configurator import ConfigError, run_config_file
from conftest import CHAR_META, HERE, files_and_mtimes, run, samples, save_checkpoint


def test_sample_from_a_chosen_step(tmp_path, dataset, capsys):
    run(tmp_path, dataset, "--max_iters=10", "--checkpoint_interval=5")
    args = [f"--out_dir={tmp_path}", "--start=def ", "--num_samples=2", "--max_new_tokens=20", "--device=cpu"]
    capsys.readouterr()
    sample.main(args + ["--from_checkpoint_step=5"])
    first = capsys.readouterr()
    assert first.out.count("def ") >= 2 and "ckpt_0000005.pt" in first.err
    sample.main(args + ["--from_checkpoint_step=5"])
    assert capsys.readouterr().out == first.out  # seeded
    absent = f"no checkpoint for step 7 in {tmp_path} (steps available: 5, 10)"
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(absent)):
        sample.main(args + ["--from_checkpoint_step=7"])


def test_sample_init_from_takes_a_checkpoint_file_or_an_out_dir_and_step(tmp_path, capsys):
    out = tmp_path / "out"
    save_checkpoint(out, CHAR_META, step=3, seed=1)
    save_checkpoint(out, CHAR_META, step=7, seed=2)
    newest, _ = samples(capsys, f"--out_dir={out}")
    step_3, _ = samples(capsys, f"--out_dir={out}", "--from_checkpoint_step=3")
    assert newest != step_3
    for source, expected in ((out, newest), (f"{out}:3", step_3), (out / "ckpt_0000003.pt", step_3)):
        got, said = samples(capsys, f"--init_from={source}")
        assert got == expected and said.startswith("sampling from "), source
    for args, message in (
            ([f"--init_from={out}", f"--out_dir={out}"], f"init_from={out} reads no out_dir"),
            ([f"--init_from={tmp_path / 'nothing'}"], f"init_from={tmp_path / 'nothing'}: not resume, gpt2, "),
            ([f"--init_from={out}:5"], f"no checkpoint for step 5 in {out} (steps available: 3, 7)")):
        with pytest.raises((ConfigError, checkpoint.CheckpointError), match=re.escape(message)):
            samples(capsys, *args)


# --- the out_dir a command meant -----------------------------------------------------------------------------------

def test_sample_and_export_name_a_similar_out_dir_that_has_checkpoints(tmp_path, capsys, monkeypatch):
    """The README once trained into out-shakespeare-char-cpu and sampled from out-shakespeare-char."""
    save_checkpoint(tmp_path / "out-shakespeare-char-cpu", CHAR_META)
    save_checkpoint(tmp_path / "unrelated", CHAR_META)
    (tmp_path / "out-shakespeare-chars").mkdir()  # closer in name, but with no checkpoint: no suggestion
    monkeypatch.chdir(tmp_path)  # as typed at the shell, relative
    before = files_and_mtimes(tmp_path)
    meant = " (did you mean --out_dir=out-shakespeare-char-cpu?)"
    for main, reader, extra in ((sample.main, "sample from", ["--device=cpu"]),
                                (export.main, "export", ["--export_dir=hf"])):
        for out_dir, hint in (("out-shakespeare-char", meant), ("out-shakespeare-char/", meant),
                              (str(tmp_path / "out-shakespeare-char"),
                               f" (did you mean --out_dir={tmp_path / 'out-shakespeare-char-cpu'}?)"),
                              ("elsewhere", "")):
            with pytest.raises(checkpoint.CheckpointError) as e:
                main([f"--out_dir={out_dir}", *extra])
            assert str(e.value) == f"no checkpoint to {reader} in {out_dir}{hint}"
    assert files_and_mtimes(tmp_path) == before and not (tmp_path / "hf").exists()


def test_the_docs_sample_and_export_the_out_dir_they_train_into():
    """In each command block of the README and docs/ that trains, every sample.py or export.py reads the folder that
    the train.py just before it wrote (its --out_dir, its config files', or the default, out): the commands of a
    block are alternatives as often as steps, and a CPU user runs the CPU config's line and the one after it."""
    checked = 0
    for path in [os.path.join(HERE, "README.md"), *sorted(glob.glob(os.path.join(HERE, "docs", "*.md")))]:
        with open(path, encoding="utf-8") as f:
            blocks = re.findall(r"```\n(.*?)```", f.read(), re.S)
        for block in blocks:
            trained = []
            for line in block.replace("\\\n", " ").splitlines():
                words = line.split("#")[0].split()
                script = next((w for w in words if w.endswith((".py", ".sh"))), None)
                flags = dict(w[2:].partition("=")[::2] for w in words if w.startswith("--"))
                if script == "train.py":
                    configs = [w for w in words[words.index("train.py") + 1:] if w.endswith(".py")]
                    out_dir = "out"
                    for config in configs:
                        out_dir = run_config_file(os.path.join(HERE, config)).get("out_dir", out_dir)
                    trained.append(flags.get("out_dir", out_dir))
                elif script in ("sample.py", "export.py") and trained and "init_from" not in flags:
                    assert flags.get("out_dir", "out") == trained[-1], f"{os.path.relpath(path, HERE)}: {line}"
                    checked += 1
    assert checked >= 4  # the quick start, both Shakespeare runs, the finetune's export


# --- plot.py -------------------------------------------------------------------------------------------------------

def write_metrics(out_dir):
    """A run that logs every 10 steps and evaluates every 50, crashes after step 130 and resumes from step 100."""
    lines = [{"step": 0, "time": 1764350000.0, "event": "start"}]
    for step in range(0, 131, 10):
        loss = 4.0 * math.exp(-step / 60) + 1.2
        lines.append({"step": step, "time": 1764350000.0 + step, "loss": loss, "lr": 1e-3, "ms_per_step": 45.0,
                      "tokens_per_s": 22000.0, "tokens": step * 1024, "mfu": None,
                      "grad_norm": 0.9})  # a key plot.py doesn't know
        if step % 50 == 0:
            lines.append({"step": step, "time": 1764350000.0 + step, "train_loss": loss - 0.05, "val_loss": loss + 0.1})
    lines.append({"step": 100, "time": 1764350500.0, "event": "resume"})
    for step in range(110, 201, 10):
        loss = 4.0 * math.exp(-step / 60) + 1.2
        lines.append({"step": step, "time": 1764350500.0 + step, "loss": loss, "lr": 1e-3, "ms_per_step": 45.0,
                      "tokens_per_s": 22000.0, "tokens": step * 1024, "mfu": 0.4})
        if step % 50 == 0:
            lines.append({"step": step, "time": 1764350500.0 + step, "train_loss": loss - 0.05, "val_loss": loss + 0.1})
    text = "".join(json.dumps(line) + "\n" for line in lines) + '{"step": 210, "time": 17643'  # torn by a crash
    path = os.path.join(out_dir, "metrics.jsonl")
    with open(path, "w") as f:
        f.write(text)
    return path


def run_plot(*args):
    return subprocess.run([sys.executable, os.path.join(HERE, "plot.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=60)


def test_read_metrics_skips_a_torn_last_line_and_keeps_unknown_keys(tmp_path):
    records, skipped = plot.read_metrics(write_metrics(tmp_path))
    assert skipped == []
    assert records[0] == {"step": 0, "time": 1764350000.0, "event": "start"}
    assert records[-1]["step"] == 200 and "val_loss" in records[-1]
    assert [r["step"] for r in records if r.get("event") == "resume"] == [100]
    assert records[1]["grad_norm"] == 0.9
    assert sum("loss" in r for r in records) == 14 + 10


def test_plot_writes_a_png(tmp_path):
    write_metrics(tmp_path)
    done = run_plot(tmp_path)
    assert done.returncode == 0, done.stderr
    png = tmp_path / "loss.png"
    assert done.stdout == f"wrote {png}\n"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    done = run_plot(tmp_path, f"--output={tmp_path / 'other.png'}")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "other.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_skips_what_is_no_record_and_names_it(tmp_path):
    """metrics.jsonl is history: a torn line, a note added by hand, bytes that are not UTF-8, a loss that is no
    number are skipped with one warning naming their lines; the plot is drawn."""
    path = write_metrics(tmp_path)
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    lines[3] = lines[3][:20]
    lines[5:5] = [b"# resumed by hand after the power cut", b"\xff\xfe not text", b'{"step": 7, "loss": "high"}']
    with open(path, "wb") as f:
        f.write(b"\n".join(lines))
    done = run_plot(tmp_path)
    assert done.returncode == 0 and (tmp_path / "loss.png").exists(), done.stderr
    assert done.stderr.startswith(f"warning: {path}: skipped lines 4, 6, 7, 8") and done.stderr.count("\n") == 1


def test_plot_refuses_missing_or_empty_metrics_and_bad_usage(tmp_path):
    done = run_plot(tmp_path)
    missing = tmp_path / "metrics.jsonl"
    assert done.returncode == 2 and done.stderr == f"error: no {missing} (train.py writes it as it runs)\n"
    done = run_plot(tmp_path / "nope")
    assert done.returncode == 2 and done.stderr == f"error: no folder {tmp_path / 'nope'}\n"
    (tmp_path / "metrics.jsonl").write_text("")
    done = run_plot(tmp_path)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1
    for args in [(), (tmp_path, tmp_path), (tmp_path, "--out=x.png"), ("--output=x.png",)]:
        done = run_plot(*args)
        assert done.returncode == 2 and done.stderr.startswith("usage: python plot.py") and done.stderr.count("\n") == 1


def test_plot_without_matplotlib_says_how_to_install_it(tmp_path):
    write_metrics(tmp_path)
    code = ("import runpy, sys; sys.modules['matplotlib'] = None; sys.argv = ['plot.py', sys.argv[1]]; "
            f"runpy.run_path({os.path.join(HERE, 'plot.py')!r}, run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr == "error: plot.py needs matplotlib: pip install matplotlib\n"
    assert not (tmp_path / "loss.png").exists()


def test_plot_tells_a_rewind_from_a_resume_and_draws_each_apart(tmp_path, dataset):  # noqa: F811 (the fixture)
    """Real runs: to step 10, resumed to 15, rewound to 5 and trained to 15 again, resumed to 20; then rewound to
    step 0. Each time, the events plot.py reads as rewinds are exactly those that followed a rewind."""
    from matplotlib.figure import Figure
    out = tmp_path / "out"
    run(out, dataset, "--max_iters=10", "--checkpoint_interval=5")
    run(out, dataset, "--max_iters=15")
    run(out, dataset, "--max_iters=15", "--from_checkpoint_step=5")
    run(out, dataset, "--max_iters=20")
    records, skipped = plot.read_metrics(out / "metrics.jsonl")
    rewinds, abandoned = plot.read_rewinds(str(out), records)
    events = [(r["event"], r["step"]) for r in records if "event" in r]
    assert skipped == [] and events == [("start", 0), ("resume", 5), ("resume", 15)]
    assert [(r["event"], r["step"]) for r in rewinds] == [("resume", 5)]
    assert len(abandoned) == 1 and ("resume", 10) in [(r.get("event"), r["step"]) for r in abandoned[0]]
    assert min(r["step"] for r in abandoned[0]) == 10 and max(r["step"] for r in abandoned[0]) == 15

    ax = Figure().subplots()
    plot.draw(ax, records, rewinds, abandoned)
    lines = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}
    assert {"train loss", "abandoned by a rewind", "resumed", "rewound"} <= set(lines)
    assert list(lines["rewound"].get_xdata()) == [5, 5] and list(lines["resumed"].get_xdata()) == [15, 15]
    assert lines["rewound"].get_linestyle() != lines["resumed"].get_linestyle()
    assert lines["rewound"].get_color() != lines["resumed"].get_color()
    assert list(lines["abandoned by a rewind"].get_xdata()) == [10, 15]

    run(out, dataset, "--max_iters=5", "--from_checkpoint_step=0")  # a rewind to 0 begins with a "start" event
    records, _ = plot.read_metrics(out / "metrics.jsonl")
    rewinds, abandoned = plot.read_rewinds(str(out), records)
    assert [(r["event"], r["step"]) for r in records if "event" in r] == [("start", 0)]
    assert rewinds == [r for r in records if "event" in r] and len(abandoned) == 2
