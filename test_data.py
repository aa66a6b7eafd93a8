"""
The data: prepared once, from any text, offline or not; checked before training; and a resume on other data is
refused:  python3 -m pytest -q -n 2 test_data.py
- char_dataset writes uint16 or uint32 tokens as the vocabulary needs, each file renamed into place, meta.json last;
- the prepare scripts take any text; offline, they say what works, to whoever ran them (by hand, or train.py);
- a dataset prepared on first use is summed up once, by rank 0, even when another process prepared it;
- the checkpoint's fingerprint of the dataset (every byte) must match: one token changed anywhere is other data;
- bad token files (dtype, vocabulary, size) are caught before anything is written.
"""
import fcntl
import json
import os
import re
import shutil
import threading
import time

import numpy as np
import pytest

import char_dataset  # in data/: conftest.py puts that folder on sys.path
import checkpoint
import train
from configurator import ConfigError
from conftest import HERE, OFFLINE, TINY, copy_prepare_script, run, run_process, write_tokens
from dataset import load_dataset


def test_char_dataset_uses_uint16_when_the_vocabulary_fits(tmp_path):
    text = "To be, or not to be, that is the question.\n" * 10
    char_dataset.write_char_dataset(text, str(tmp_path))
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == len(set(text))
    ids = np.fromfile(tmp_path / "train.bin", dtype=np.uint16)
    assert os.path.getsize(tmp_path / "train.bin") == 2 * int(0.9 * len(text))
    assert "".join(meta["chars"][i] for i in ids) == text[:int(0.9 * len(text))]


def test_char_dataset_uses_uint32_beyond_65536_characters(tmp_path):
    chars = [chr(c) for c in range(32, 32 + 70000) if not 0xD800 <= c <= 0xDFFF]  # surrogates are no text
    text = "".join(reversed(chars)) * 2
    char_dataset.write_char_dataset(text, str(tmp_path))
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == len(chars) > 65536
    n = int(0.9 * len(text))
    train = np.fromfile(tmp_path / "train.bin", dtype=np.uint32)
    val = np.fromfile(tmp_path / "val.bin", dtype=np.uint32)
    assert "".join(meta["chars"][i] for i in train) == text[:n]
    assert "".join(meta["chars"][i] for i in val) == text[n:]


def test_char_dataset_renames_each_file_into_place_meta_json_last(tmp_path, monkeypatch):
    renames, replace = [], os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renames.append((src, dst)), replace(src, dst)))
    char_dataset.write_char_dataset("hello world\n" * 10, str(tmp_path))
    assert [os.path.basename(dst) for _, dst in renames] == ["train.bin", "val.bin", "meta.json"]
    assert all(src == f"{dst}.tmp{os.getpid()}" for src, dst in renames)
    assert sorted(os.listdir(tmp_path)) == ["meta.json", "train.bin", "val.bin"]


# --- the prepare scripts -------------------------------------------------------------------------------------------

def test_prepare_scripts_write_a_dataset_from_any_text(tmp_path):
    data = copy_prepare_script(tmp_path, "shakespeare_char")
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 100)
    done = run_process([str(data / "shakespeare_char" / "prepare.py"), f"--input={text}"])
    assert done.returncode == 0, done.stderr
    meta = json.loads((data / "shakespeare_char" / "meta.json").read_text())
    ids = np.fromfile(data / "shakespeare_char" / "train.bin", dtype=np.uint16)
    assert meta["vocab_size"] == len(set(text.read_text())) and len(ids) == int(0.9 * len(text.read_text()))
    assert "".join(meta["chars"][i] for i in ids[:18]) == "To be, or not to b"
    done = run_process([str(data / "shakespeare_char" / "prepare.py"), f"--input={tmp_path / 'missing.txt'}"])
    assert done.returncode != 0 and done.stderr.strip().count("\n") == 0 and "missing.txt" in done.stderr


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


def prepare_folder(tmp_path, name, text):
    """data/shakespeare_char's prepare.py (and the module it imports) in tmp_path/<name>/, with text as input.txt."""
    folder = tmp_path / name / "shakespeare_char"
    folder.mkdir(parents=True)
    shutil.copy(os.path.join(HERE, "data", "char_dataset.py"), folder.parent)
    shutil.copy(os.path.join(HERE, "data", "shakespeare_char", "prepare.py"), folder)
    (folder / "input.txt").write_text(text)
    return folder


def test_a_dataset_prepared_on_first_use_is_summed_up_once_by_rank_0(tmp_path, capsys, monkeypatch):
    shared = os.path.join(HERE, "..", "shared", "data", "tinyshakespeare.txt")
    text = open(shared if os.path.exists(shared) else os.__file__, encoding="utf-8").read()
    folder = prepare_folder(tmp_path, "a", text)
    _, train_ids, val_ids, _ = load_dataset(str(folder), 16)
    n = int(0.9 * len(text))
    assert (len(train_ids), len(val_ids)) == (n, len(text) - n)
    summary = (f"dataset {folder} prepared in {folder}: {n:,} train and {len(text) - n:,} val tokens; vocabulary: "
               f"{len(set(text))} characters\n")
    assert capsys.readouterr().out == f"dataset {folder} is not prepared yet: running {folder}/prepare.py\n" + summary
    load_dataset(str(folder), 16)
    assert capsys.readouterr().out == ""  # prepared before: nothing to say
    # another rank: it prepares, and leaves the summary to rank 0
    monkeypatch.setenv("RANK", "1")
    load_dataset(str(prepare_folder(tmp_path, "b", text[:5000])), 16)
    assert "prepared in" not in capsys.readouterr().out
    # rank 0 waits while another process prepares (it holds the lock, then writes the files): rank 0 sums up
    monkeypatch.setenv("RANK", "0")
    other = prepare_folder(tmp_path, "c", text)
    with open(other / "prepare.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        waiting = threading.Thread(target=load_dataset, args=(str(other), 16))
        waiting.start()
        time.sleep(0.3)
        for name in ("train.bin", "val.bin", "meta.json"):
            shutil.copy(folder / name, other)
    waiting.join()
    assert capsys.readouterr().out == summary.replace(str(folder), str(other))


# --- other data, bad data ------------------------------------------------------------------------------------------

def test_a_resume_on_other_data_is_refused(tmp_path, dataset):
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    run(tmp_path / "out", str(data), "--max_iters=5")
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    run(tmp_path / "out", str(moved), "--max_iters=6")  # the same data in another folder is the same data
    char_dataset.write_char_dataset(open(os.__file__).read()[::-1] * 2, str(data))  # prepared again, from other text
    with pytest.raises(ConfigError, match=r"dataset .*data is not the data step 6 was trained on \(.*vocab_size .*"
                                          r"sampled sha256 .*\); to train these weights on other data, "
                                          r"start a new run"):
        run(tmp_path / "out", str(data), "--max_iters=10")
    assert checkpoint.list_steps(str(tmp_path / "out")) == [5, 6]


def test_one_token_changed_anywhere_is_other_data(tmp_path):
    """Any byte counts: one token changed in place between the 32 sampled blocks, the file's size and times put
    back, is refused at a resume; the whole-file hash is computed once and remembered by the file's identity."""
    data = tmp_path / "data"
    write_tokens(data, np.random.default_rng(0).integers(0, 60, 2_000_000).astype(np.uint16), {"vocab_size": 60})
    run(tmp_path / "out", str(data), "--max_iters=2")
    assert json.loads((data / "fingerprints.json").read_text()).keys() == {"train.bin", "val.bin"}
    path, middle = data / "train.bin", (32768 + 1_800_000 // 31) // 2  # between the first two sampled blocks
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(2 * middle)
        old = np.frombuffer(f.read(2), dtype=np.uint16)[0]
        f.seek(2 * middle)
        f.write(np.array([(old + 1) % 60], dtype=np.uint16).tobytes())
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(ConfigError, match=r"not the data step 2 was trained on \(train.bin sha256 [0-9a-f]+ -> "):
        run(tmp_path / "out", str(data), "--max_iters=4")
    assert checkpoint.list_steps(str(tmp_path / "out")) == [2]


def test_token_dtypes_and_data_errors_are_caught_before_anything_is_written(tmp_path):
    ids = np.random.default_rng(0).integers(0, 70000, 5000)
    write_tokens(tmp_path / "wide", ids.astype(np.uint32), {"vocab_size": 70000, "dtype": "uint32"})
    run(tmp_path / "out", str(tmp_path / "wide"), "--max_iters=2")  # ids above 65535 need uint32, and train
    cases = [
        (ids.astype(np.uint32), {"vocab_size": 70000}, "vocab_size 70000 does not fit uint16 token ids"),
        (ids.astype(np.uint16) % 60, {"vocab_size": 50}, "holds token id 59, outside meta.json's vocab_size 50"),
        (ids.astype(np.uint16) % 50, {"vocab_size": 50, "dtype": "int8"}, "meta.json's dtype must be uint16 or uint32"),
    ]
    for i, (data, meta, message) in enumerate(cases):
        write_tokens(tmp_path / f"bad{i}", data, meta)
        with pytest.raises(ConfigError, match=re.escape(message)):
            run(tmp_path / f"never{i}", str(tmp_path / f"bad{i}"), "--max_iters=2")
        assert not (tmp_path / f"never{i}").exists()
    with open(tmp_path / "bad1" / "train.bin", "ab") as f:
        f.write(b"\0")  # half a token
    with pytest.raises(ConfigError, match=r"train.bin is 9001 bytes: not a whole number of uint16 tokens"):
        run(tmp_path / "never", str(tmp_path / "bad1"), "--max_iters=2")
