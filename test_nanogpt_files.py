"""
nanoGPT's files, and what the scripts beside train.py say, on tiny models on the CPU:
    python3 -m pytest -q test_nanogpt_files.py
- nanoGPT's character-level ckpt.pt samples and exports with the characters of its dataset's meta.pkl, found where
  nanoGPT's sample.py finds it (or through --dataset), read as plain data; each way it can fail is one line that
  says where it looked and what to pass;
- reading a folder nanoGPT prepared writes nothing into it (its whole-file hashes are kept in a cache of ours),
  and the fingerprint still refuses other data;
- `python checkpoint.py` says what a folder holds when it holds no checkpoint of ours, and every note it prints
  is true (the leftovers it says train.py removes are removed, a folder it says reads as an out_dir does);
- a sampling temperature that would make the logits overflow or vanish is refused before any sampling;
- what sample.py, export.py and plot.py print on a real run is what they did.
"""
import hashlib
import json
import os
import pickle
import re
import shutil

import numpy as np
import pytest
import torch

import checkpoint
import dataset as data
import export
import sample
from configurator import ConfigError
from model import GPT, GPTConfig
from conftest import HERE, files_and_mtimes, run, run_process

os.environ["OMP_NUM_THREADS"] = "1"

CHARS = sorted(set("First Citizen:\nBefore we proceed any further, hear me speak.\n"))
ARGS = dict(n_layer=1, n_head=2, n_embd=16, block_size=32, bias=False, vocab_size=len(CHARS), dropout=0.0)


def tiny_model(seed=0, **shape):
    """A tiny random model, its weights drawn wide so that samples tell one set of weights from another."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**(ARGS | shape)))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model


def nanogpt_meta_pkl(folder, chars):
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)}}
    (folder / "meta.pkl").write_bytes(pickle.dumps(meta))


def nanogpt_ckpt(out_dir, model, config):
    """nanoGPT's ckpt.pt, as its train.py saves it: torch.compile's names, model_args, iter_num, config."""
    out_dir.mkdir(parents=True, exist_ok=True)
    args = {k: getattr(model.config, k) for k in ARGS}
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}, "optimizer": {},
                "model_args": args, "iter_num": 250, "best_val_loss": torch.tensor(1.5), "config": config},
               out_dir / "ckpt.pt")
    return out_dir / "ckpt.pt"


def samples(capsys, *args):
    """(what sample.py prints, what it says on stderr), seeded: the same weights give the same text."""
    capsys.readouterr()
    sample.main(["--device=cpu", "--num_samples=2", "--max_new_tokens=30", "--start=First", "--top_k=0", *args])
    printed = capsys.readouterr()
    return printed.out, printed.err


# --- nanoGPT's character-level ckpt.pt --------------------------------------------------------------------------

@pytest.mark.parity
def test_a_nanogpt_character_checkpoint_samples_and_exports_with_its_meta_pkl(tmp_path, capsys, monkeypatch):
    """nanoGPT's layout: data/<dataset>/meta.pkl beside out-<run>/ckpt.pt. sample.py and export.py find the meta.pkl
    from the checkpoint's config, relative to the current folder or to the checkpoint's folder, say which one they
    used, and decode as a checkpoint of ours with the same weights and characters does."""
    model = tiny_model()
    ours = tmp_path / "ours"
    ours.mkdir()
    checkpoint.save(str(ours), 250, {"model": model.state_dict(), "model_args": ARGS, "step": 250,
                                     "meta": {"vocab_size": len(CHARS), "chars": CHARS}})
    expected, _ = samples(capsys, f"--out_dir={ours}")
    root = tmp_path / "nanoGPT"
    nanogpt_meta_pkl(root / "data" / "tiny_char", CHARS)
    ckpt = nanogpt_ckpt(root / "out-tiny-char", model, {"dataset": "tiny_char", "batch_size": 12})
    pkl = root / "data" / "tiny_char" / "meta.pkl"
    before = files_and_mtimes(root)

    monkeypatch.chdir(tmp_path)  # elsewhere: the meta.pkl beside the checkpoint's folder
    for args in ([f"--out_dir={root / 'out-tiny-char'}"], [f"--init_from={ckpt}"]):
        got, said = samples(capsys, *args)
        assert got == expected, args
        assert said.count("\n") == 2 and str(pkl) in said and f"{len(CHARS)} characters" in said and str(ckpt) in said
    monkeypatch.chdir(root)  # where nanoGPT's sample.py runs: data/tiny_char/meta.pkl, relative
    got, said = samples(capsys, "--out_dir=out-tiny-char")
    assert got == expected and os.path.join("data", "tiny_char", "meta.pkl") in said

    hf = tmp_path / "hf"
    capsys.readouterr()
    export.main(["--out_dir=out-tiny-char", f"--export_dir={hf}"])
    printed = capsys.readouterr()
    assert os.path.join("data", "tiny_char", "meta.pkl") in printed.err and "step 250" in printed.out
    vocab = json.loads((hf / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    assert sorted(vocab, key=vocab.get) == CHARS
    assert samples(capsys, f"--init_from={hf}")[0] == expected
    assert files_and_mtimes(root) == before  # nanoGPT's folders only read

    # elsewhere, --dataset names the folder (or a name under data/); without it, one line says where it looked
    monkeypatch.chdir(tmp_path)
    shutil.move(str(root / "data" / "tiny_char"), str(tmp_path / "moved"))
    with pytest.raises(ConfigError) as e:
        samples(capsys, f"--out_dir={root / 'out-tiny-char'}")
    for fact in (str(ckpt), os.path.join("data", "tiny_char"), str(root / "data" / "tiny_char"), "--dataset="):
        assert fact in str(e.value)
    got, said = samples(capsys, f"--out_dir={root / 'out-tiny-char'}", f"--dataset={tmp_path / 'moved'}")
    assert got == expected and str(tmp_path / "moved" / "meta.pkl") in said
    shutil.copytree(tmp_path / "moved", tmp_path / "data" / "renamed")
    assert samples(capsys, f"--init_from={ckpt}", "--dataset=renamed")[0] == expected
    with pytest.raises(ConfigError) as e:
        export.main([f"--out_dir={root / 'out-tiny-char'}", f"--export_dir={tmp_path / 'hf2'}"])
    assert "--dataset=" in str(e.value) and not (tmp_path / "hf2").exists()


@pytest.mark.parity
def test_each_way_a_nanogpt_vocabulary_is_not_found_is_one_line_that_says_what_to_pass(tmp_path, capsys):
    model = tiny_model()
    no_name = nanogpt_ckpt(tmp_path / "no-name", model, {"batch_size": 12})  # a config naming no dataset
    with pytest.raises(ConfigError) as e:
        samples(capsys, f"--init_from={no_name}")
    assert str(no_name) in str(e.value) and "--dataset=" in str(e.value)
    nanogpt_meta_pkl(tmp_path / "fewer", CHARS[:-1])  # another dataset's characters
    with pytest.raises(ConfigError) as e:
        samples(capsys, f"--init_from={no_name}", f"--dataset={tmp_path / 'fewer'}")
    assert str(tmp_path / "fewer" / "meta.pkl") in str(e.value)
    assert re.search(rf"\b{len(CHARS) - 1}\b", str(e.value)) and re.search(rf"\b{len(CHARS)}\b", str(e.value))
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": len(CHARS), "itos": Exploit()}))
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'evil' / 'meta.pkl'} is not nanoGPT's meta.pkl")):
        samples(capsys, f"--init_from={no_name}", f"--dataset={tmp_path / 'evil'}")
    assert not marker.exists()
    ours = tmp_path / "ours"  # a checkpoint of ours carries its vocabulary: --dataset would change nothing
    ours.mkdir()
    checkpoint.save(str(ours), 5, {"model": model.state_dict(), "model_args": ARGS, "step": 5,
                                   "meta": {"vocab_size": len(CHARS), "chars": CHARS}})
    for main, args in ((sample.main, ["--device=cpu"]), (export.main, [f"--export_dir={tmp_path / 'hf'}"])):
        with pytest.raises(ConfigError) as e:
            main([f"--out_dir={ours}", f"--dataset={tmp_path / 'fewer'}", *args])
        assert "--dataset" in str(e.value) and str(checkpoint.path_for(str(ours), 5)) in str(e.value)
    done = run_process(["sample.py", f"--init_from={no_name}", "--device=cpu"])  # as a process: one line, exit 2
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and done.stderr.startswith("error: "), done.stderr


# --- a folder nanoGPT prepared is only read ----------------------------------------------------------------------

@pytest.mark.parity
def test_reading_a_nanogpt_data_folder_writes_nothing_in_it(tmp_path, monkeypatch):
    """train.bin, val.bin and meta.pkl (characters), or with no meta and nanoGPT's own prepare.py beside them (its
    OpenWebText): training and resuming on them leave every file byte for byte and mtime as it was, add none, and
    run no prepare.py; the whole-file hashes are remembered in our cache, and a token changed with its mtime put
    back is still other data."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    ids = np.random.default_rng(0).integers(0, len(CHARS), 2_000_000).astype(np.uint16)
    chars, bpe = tmp_path / "nano-chars", tmp_path / "nano-bpe"
    for folder in (chars, bpe):
        folder.mkdir()
        ids[:1_800_000].tofile(folder / "train.bin")
        ids[1_800_000:].tofile(folder / "val.bin")
    nanogpt_meta_pkl(chars, CHARS)
    (bpe / "prepare.py").write_text("open(__file__ + '.ran', 'w')  # nanoGPT's: writes train.bin, val.bin, no meta\n")
    small = ["--n_embd=16", "--n_head=1", "--n_layer=1"]  # GPT-2's 50257 ids
    for folder, flags in ((chars, []), (bpe, small)):
        before = {p: (open(p, "rb").read(), os.stat(p).st_mtime_ns) for p in sorted(folder.iterdir())}
        out = tmp_path / f"out-{folder.name}"
        run(out, str(folder), "--max_iters=2", *flags)
        run(out, str(folder), "--max_iters=4", *flags)  # a resume: the cached hashes, and the same data
        assert checkpoint.list_steps(str(out)) == [2, 4]
        assert {p: (open(p, "rb").read(), os.stat(p).st_mtime_ns) for p in sorted(folder.iterdir())} == before
        cache = data.fingerprint_cache(str(folder))
        assert cache.startswith(str(tmp_path / "cache" / "gpt-resume")), cache
        assert json.loads(open(cache).read()).keys() == {"train.bin", "val.bin"}

        path, middle = folder / "train.bin", (32768 + 1_800_000 // 31) // 2  # between the first two sampled blocks
        st = os.stat(path)
        with open(path, "r+b") as f:
            f.seek(2 * middle)
            old = np.frombuffer(f.read(2), dtype=np.uint16)[0]
            f.seek(2 * middle)
            f.write(np.array([(old + 1) % len(CHARS)], dtype=np.uint16).tobytes())
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        with pytest.raises(ConfigError, match=r"not the data step 4 was trained on \(train.bin sha256 [0-9a-f]+ -> "):
            run(out, str(folder), "--max_iters=6", *flags)


@pytest.mark.parity
def test_a_half_made_nanogpt_folder_is_not_prepared_by_its_own_prepare_py(tmp_path):
    """nanoGPT's prepare.py writes no meta.json: it is never run here (its OpenWebText's takes hours), and the
    error names what is missing and the script to run by hand; nothing is added to the folder."""
    half = tmp_path / "nano-half"
    half.mkdir()
    np.zeros(1000, dtype=np.uint16).tofile(half / "train.bin")
    nanogpt_meta_pkl(half, CHARS)
    (half / "prepare.py").write_text("open(__file__ + '.ran', 'w')  # nanoGPT's: writes train.bin, val.bin, meta.pkl\n")
    before = files_and_mtimes(half)
    with pytest.raises(ConfigError) as e:
        run(tmp_path / "out", str(half), "--max_iters=1")
    assert str(half / "val.bin") in str(e.value) and str(half / "prepare.py") in str(e.value)
    assert files_and_mtimes(half) == before and sorted(os.listdir(half)) == ["meta.pkl", "prepare.py", "train.bin"]


def test_a_folder_of_ours_keeps_its_hashes_beside_its_data(tmp_path, dataset):
    assert data.fingerprint_cache(dataset) == os.path.join(dataset, "fingerprints.json")
    assert data.writes_meta_json(os.path.join(HERE, "data", "shakespeare", "prepare.py"))
    assert data.writes_meta_json(os.path.join(HERE, "data", "python_char", "prepare.py"))
    assert data.writes_meta_json(os.path.join(HERE, "data", "openwebtext", "prepare.py"))


# --- python checkpoint.py: what a folder holds ------------------------------------------------------------------

def checkpoint_py(folder):
    done = run_process(["checkpoint.py", str(folder)])
    return done.returncode, done.stdout.splitlines(), done.stderr


def test_checkpoint_py_says_what_a_folder_holds_and_each_note_is_true(tmp_path, dataset):
    header = "step  written"
    empty = tmp_path / "empty"
    empty.mkdir()
    code, lines, _ = checkpoint_py(empty)
    assert code == 0 and len(lines) == 1 and str(empty) in lines[0] and "empty" in lines[0]

    nano = tmp_path / "out-nano"  # nanoGPT's ckpt.pt alone: no header; what starts a run from it, what samples it
    ckpt = nanogpt_ckpt(nano, tiny_model(), {"dataset": "tiny_char"})
    code, lines, _ = checkpoint_py(nano)
    assert code == 0 and not any(header in line for line in lines) and str(nano) in lines[0]
    assert f"python train.py --init_from={ckpt}" in lines[1] and f"python sample.py --init_from={ckpt}" in lines[1]

    out = tmp_path / "out"  # only what a rewind set aside, and temporaries of a crash mid-save
    run(out, dataset, "--max_iters=10", "--checkpoint_interval=5")
    aside = out / "abandoned-20260101-000000"
    aside.mkdir()
    for step in (5, 10):
        os.replace(checkpoint.path_for(str(out), step), checkpoint.path_for(str(aside), step))
    shutil.copy(checkpoint.path_for(str(aside), 10), out / "ckpt_0000015.pt.tmp")
    (out / "notes.tmp").write_text("a file of the user's: no leftover of ours\n")
    code, lines, _ = checkpoint_py(out)
    assert code == 0 and not any(header in line for line in lines) and str(out) in lines[0]
    text = "\n".join(lines)
    assert aside.name in text and "ckpt_0000015.pt.tmp" in text and "notes.tmp" not in text
    code, lines, _ = checkpoint_py(aside)  # "each reads as an out_dir"
    assert code == 0 and header in lines[0] and [line.split()[0] for line in lines[1:]] == ["5", "10"]
    run(out, dataset, "--max_iters=5")  # "train.py removes them when it next starts here"
    assert not (out / "ckpt_0000015.pt.tmp").exists() and (out / "notes.tmp").exists()
    shutil.copy(ckpt, out / "ckpt.pt")  # ours and nanoGPT's: the table, and a note on the one it does not list
    code, lines, _ = checkpoint_py(out)
    assert code == 0 and header in lines[0] and lines[1].split()[0] == "5" and lines[1].endswith("ok")
    assert any(f"--init_from={out / 'ckpt.pt'}" in line for line in lines[2:])

    for wrong in ([str(tmp_path / "nowhere")], [str(ckpt)], []):  # one line, exit 2
        done = run_process(["checkpoint.py", *wrong])
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and done.stderr.startswith("error: "), wrong
        assert all(arg in done.stderr for arg in wrong)


# --- numbers that overflow ---------------------------------------------------------------------------------------

def test_a_temperature_that_overflows_or_vanishes_the_logits_is_refused_before_sampling(tmp_path, capsys):
    """Sampling divides the logits by the temperature: one so small that they overflow (nanoGPT's sample.py then
    fails in torch.multinomial), or so large that all underflow (sampling uniform, top_k ignored), is one line
    naming the temperature and the range that works, given before any sampling; the range's ends sample."""
    out = tmp_path / "out"
    out.mkdir()
    model = tiny_model()
    checkpoint.save(str(out), 5, {"model": model.state_dict(), "model_args": ARGS, "step": 5,
                                  "meta": {"vocab_size": len(CHARS), "chars": CHARS}})
    bound = sample.logit_bound(model, len(CHARS))
    with torch.no_grad():  # a bound: no logit of any position of random contexts exceeds it
        logits, _ = model.eval()(torch.randint(len(CHARS), (64, 32)), torch.zeros(64, 32, dtype=torch.long))
    assert 0 < logits.abs().max().item() <= bound
    low = max(bound / torch.finfo(torch.float32).max, torch.finfo(torch.float32).tiny)
    high = min(bound / torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max)
    for temperature in (1e-300, 1e-40, low / 2, high * 2, 1e300):
        capsys.readouterr()
        with pytest.raises(ConfigError) as e:
            samples(capsys, f"--out_dir={out}", f"--temperature={temperature!r}")
        assert f"temperature={temperature}" in str(e.value) and f"{low:.3g}" in str(e.value), str(e.value)
        assert f"{high:.3g}" in str(e.value) and "float32" in str(e.value)
        assert capsys.readouterr().out == ""  # nothing sampled
    greedy, _ = samples(capsys, f"--out_dir={out}", "--top_k=1")
    assert samples(capsys, f"--out_dir={out}", f"--temperature={low * 2!r}")[0] == greedy  # the low end: greedy
    assert samples(capsys, f"--out_dir={out}", f"--temperature={high / 2!r}")[0]
    # under float16 autocast the logits overflow at 65504: the same bound refuses what float32 allows
    with pytest.raises(ConfigError, match=r"can overflow float16"):
        sample.check_temperature(bound / 70000, bound, "float16", "x")
    sample.check_temperature(bound / 70000, bound, "float32", "x")
    sample.check_temperature(bound / 60000, bound, "float16", "x")
    with pytest.raises(ConfigError, match="not all finite"):
        sample.check_temperature(0.8, float("inf"), "float32", "x")
    # the command, as a process: one line, exit 2, no traceback
    done = run_process(["sample.py", f"--out_dir={out}", "--device=cpu", "--temperature=1e-300"])
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "temperature=1e-300" in done.stderr, done.stderr


@pytest.mark.parametrize("flag, key", [("--num_samples=0", "num_samples"), ("--max_new_tokens=-1", "max_new_tokens"),
                                       ("--top_k=-1", "top_k"), ("--seed=-1", "seed"), (f"--seed={2 ** 63}", "seed"),
                                       ("--temperature=0.0", "temperature"), ("--temperature=1e309", "temperature")])
def test_sample_numbers_out_of_range_are_refused_before_reading_anything(tmp_path, flag, key):
    with pytest.raises(ConfigError, match=key):
        sample.main([f"--out_dir={tmp_path / 'none'}", "--device=cpu", flag])


# --- what the scripts print on a real run -----------------------------------------------------------------------

def test_what_sample_export_and_plot_print_on_a_real_run_is_what_they_did(tmp_path, dataset):
    out = tmp_path / "out"
    run(out, dataset, "--max_iters=20", "--checkpoint_interval=10")
    for step_flag, step in (([], 20), (["--from_checkpoint_step=10"], 10)):
        done = run_process(["sample.py", f"--out_dir={out}", "--device=cpu", "--num_samples=2", "--max_new_tokens=5",
                            *step_flag])
        assert done.returncode == 0 and done.stderr == f"sampling from {checkpoint.path_for(str(out), step)}\n"
        assert done.stdout.count("---------------\n") == 2
    hf = tmp_path / "hf"
    done = run_process(["export.py", f"--out_dir={out}", f"--export_dir={hf}", "--from_checkpoint_step=10"])
    assert done.returncode == 0 and done.stderr == "" and done.stdout.count("\n") == 1
    assert "step 10" in done.stdout and checkpoint.path_for(str(out), 10) in done.stdout and str(hf) in done.stdout
    assert sorted(done.stdout.strip().split(": ", 1)[1].split(", ")) == sorted(os.listdir(hf))
    done = run_process(["plot.py", str(out)])
    assert done.returncode == 0 and done.stdout == f"wrote {out / 'loss.png'}\n" and (out / "loss.png").stat().st_size
    with open(out / "metrics.jsonl", "a") as f:
        f.write("a note\nanother\n")
    done = run_process(["plot.py", str(out)])
    assert done.returncode == 0 and done.stderr.count("\n") == 1 and "skipped lines " in done.stderr
    lines = sum(1 for _ in open(out / "metrics.jsonl"))
    assert f"{lines - 1}, {lines}:" in done.stderr


@pytest.mark.parity
def test_a_nanogpt_checkpoint_as_init_from_is_not_said_to_have_another_vocabulary(tmp_path, dataset, capsys):
    """Its vocabulary is in meta.pkl, which train.py does not read: the run says it cannot check it, not that it
    differs."""
    meta = json.loads(open(os.path.join(dataset, "meta.json")).read())
    ckpt = nanogpt_ckpt(tmp_path / "nano", tiny_model(vocab_size=meta["vocab_size"]), {"dataset": "x"})
    run(tmp_path / "out", dataset, f"--init_from={ckpt}", "--n_layer=1", "--n_embd=16", "--max_iters=1")
    said = capsys.readouterr().out
    assert "is not init_from's" not in said and "does not carry its vocabulary" in said


def test_fingerprint_cache_is_keyed_by_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    a, b = data.fingerprint_cache(str(tmp_path / "a")), data.fingerprint_cache(str(tmp_path / "b"))
    assert a != b and os.path.dirname(a) == os.path.dirname(b) == str(tmp_path / "gpt-resume" / "fingerprints")
    assert os.path.basename(a).startswith(hashlib.sha256(str(tmp_path / "a").encode()).hexdigest()[:32])
