"""
A dataset is a folder with train.bin and val.bin (token ids, uint16 or uint32, back to back) and meta.json
(vocab_size, the ids' dtype, and the vocabulary: "chars", or "tokenizer": "gpt2"); a folder nanoGPT prepared
(meta.pkl, or no meta for GPT-2's BPE) reads as it is. load_dataset prepares one that
is not yet (running its prepare.py, one process at a time), checks everything training relies on, and
fingerprints it, so a resume on other data is refused.

The exact-resume contract, which a replacement loader must keep: the batch of every step, and the dropout mask of
every micro-step, is a pure function of (seed, step, row or micro-step in the global batch). Then a resume needs no
loader or RNG state, 1 rank or N ranks compute the same global batch, and a rewind recomputes what it recomputes
exactly. A streaming loader that remembers where it is breaks this silently: it must be able to start at any step.
"""
import difflib
import fcntl
import hashlib
import io
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import torch

from configurator import ConfigError
from stops import is_rank_0

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
# the three uses of the seed, kept independent of each other
TRAIN_STREAM = 0
EVAL_STREAM = 1
DROPOUT_STREAM = 2
TOKEN_DTYPES = ("uint16", "uint32")  # what meta.json's "dtype" may say; uint16 when it says nothing


def dataset_dir(name):
    """A name under data/ (shakespeare_char), or a path to a folder anywhere (./mine, /data/owt)."""
    return name if os.sep in name or name.startswith(".") else os.path.join(DATA_DIR, name)


def writes_meta_json(script):
    """Whether the prepare.py at `script` is one of ours, which writes meta.json last (itself or through
    char_dataset): nanoGPT's (openwebtext, shakespeare) write none, and are never run on a dataset they made."""
    try:
        with open(script, encoding="utf-8", errors="replace") as f:
            source = f.read()
    except OSError:
        return False
    return "meta.json" in source or "write_char_dataset" in source


def prepare(name, folder, paths):
    """Run the folder's prepare.py, one of ours, if some file is missing; torchrun's ranks queue on a lock and the
    first prepares. Returns whether the dataset was prepared now, by this process or by one it waited for. The
    script's output is kept for an error's line: load_dataset sums up what it wrote."""
    script = os.path.join(folder, "prepare.py")
    if all(map(os.path.exists, paths)) or not writes_meta_json(script):  # nanoGPT's prepare.py: its folder is its own
        return False
    try:
        with open(os.path.join(folder, "prepare.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not all(map(os.path.exists, paths)):  # or another process prepared it while we waited
                print(f"dataset {name} is not prepared yet: running {script}")
                done = subprocess.run([sys.executable, script], capture_output=True, text=True)
                if done.returncode:
                    last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
                    raise ConfigError(f"dataset {name}: {script} failed: {last}")
    except OSError as e:
        raise ConfigError(f"dataset {name}: cannot prepare it in {folder}: {e.strerror}") from None
    return True


def load_dataset(name, block_size, trained_on=None):
    """Prepare the dataset if it is not yet, check all that training relies on, and return (meta, train, val,
    fingerprint). The fingerprint (vocabulary, token dtype, sizes, a hash of every byte of each file, and an older
    one of meta.json and 32 spread blocks) identifies the data: trained_on, a resume's (step, fingerprint), refuses
    other data, and the same data skips the scan of every token id, done when the run began. A file the system
    cannot read (EIO, EACCES) is one line that names it."""
    try:
        return _load_dataset(name, block_size, trained_on)
    except OSError as e:  # its every read is of the dataset's files
        raise ConfigError(f"dataset {name}: cannot read {e.filename or dataset_dir(name)}: {e.strerror}") from None


def _load_dataset(name, block_size, trained_on):
    folder = dataset_dir(name)
    paths = [os.path.join(folder, f) for f in ("train.bin", "val.bin", "meta.json")]
    # nanoGPT's layout: train.bin and val.bin with meta.pkl, or alone where no prepare.py of ours is at work (it
    # writes meta.json last, so its dataset half-made looks the same)
    meta_pkl = os.path.join(folder, "meta.pkl")
    nanogpt = all(map(os.path.exists, paths[:2])) and not os.path.exists(paths[2]) and (
        os.path.exists(meta_pkl) or not writes_meta_json(os.path.join(folder, "prepare.py")))
    prepared = not nanogpt and prepare(name, folder, paths)
    if nanogpt:
        meta_bytes, meta = nanogpt_meta(name, meta_pkl)
    missing = [f for f in paths if not os.path.exists(f)]
    if missing and not nanogpt:
        under_data = folder == os.path.join(DATA_DIR, name)
        close = difflib.get_close_matches(name, os.listdir(DATA_DIR), n=1) if under_data else []
        hint = f" (did you mean {close[0]}?)" if close else ""
        script = os.path.join(folder, "prepare.py")
        if os.path.exists(script) and not writes_meta_json(script):
            hint = f" ({script} writes no meta.json, as nanoGPT's do: it is not run here; run it yourself)"
        raise ConfigError(f"dataset {name}: missing {', '.join(missing)}{hint}")
    try:
        if not nanogpt:
            with open(paths[2], "rb") as f:
                meta_bytes = f.read()
            meta = json.loads(meta_bytes)
        assert type(meta["vocab_size"]) is int and meta["vocab_size"] > 0
    except (ValueError, KeyError, TypeError, AssertionError):
        raise ConfigError(f"dataset {name}: {paths[2]} has no positive integer vocab_size") from None
    if meta.get("dtype", "uint16") not in TOKEN_DTYPES:
        raise ConfigError(f"dataset {name}: meta.json's dtype must be uint16 or uint32, got {meta['dtype']!r}")
    dtype = np.dtype(meta.get("dtype", "uint16"))
    if meta["vocab_size"] > np.iinfo(dtype).max + 1:
        raise ConfigError(f"dataset {name}: vocab_size {meta['vocab_size']} does not fit {dtype} token ids; "
                          f"meta.json must say \"dtype\": \"uint32\"")
    digest, arrays = hashlib.sha256(meta_bytes), []
    for path in paths[:2]:
        size = os.path.getsize(path)
        if size % dtype.itemsize or size // dtype.itemsize <= block_size:
            raise ConfigError(f"dataset {name}: {path} is {size} bytes: not a whole number of {dtype} tokens, "
                              f"or fewer than block_size+1 = {block_size + 1} of them")
        data = np.memmap(path, dtype=dtype, mode="r")
        for i in np.linspace(0, max(len(data) - (1 << 15), 0), 32).astype(np.int64):
            digest.update(data[i:i + (1 << 15)].tobytes())
        arrays.append(data)
    fingerprint = {"vocab_size": meta["vocab_size"], "dtype": str(dtype),
                   "train.bin bytes": os.path.getsize(paths[0]), "val.bin bytes": os.path.getsize(paths[1]),
                   "sampled sha256": digest.hexdigest(), **whole_file_hashes(folder, paths[:2])}
    step, known = trained_on or (None, None)
    # a checkpoint written before the whole-file hashes were has the other keys only: those are compared
    if known is not None and any(known[k] != v for k, v in fingerprint.items() if k in known):
        changes = [f"{k} {known.get(k)} -> {v}" for k, v in fingerprint.items() if k in known and known[k] != v]
        raise ConfigError(f"dataset {name} is not the data step {step} was trained on ({'; '.join(changes)}); "
                          f"to train these weights on other data, start a new run")
    if known is None:  # every id once, so that no batch indexes past the embedding mid-run
        for path, data in zip(paths, arrays):
            top = max(int(data[i:i + (1 << 26)].max()) for i in range(0, len(data), 1 << 26))
            if top >= meta["vocab_size"]:
                raise ConfigError(f"dataset {name}: {path} holds token id {top}, outside meta.json's vocab_size "
                                  f"{meta['vocab_size']}; prepare the dataset again")
    if prepared and is_rank_0():  # what the first run trains on, said once, whichever rank ran prepare.py
        kind = "characters" if "chars" in meta else "GPT-2 BPE tokens" if meta.get("tokenizer") == "gpt2" else "ids"
        print(f"dataset {name} prepared in {folder}: {len(arrays[0]):,} train and {len(arrays[1]):,} val tokens; "
              f"vocabulary: {meta['vocab_size']:,} {kind}")
    return meta, arrays[0], arrays[1], fingerprint


class _PlainData(pickle.Unpickler):
    """Unpickles dicts, lists, strings and numbers, which need no class: anything else, code included, is refused."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"{module}.{name} is not plain data")


def nanogpt_meta(name, path):
    """(the bytes it was read from, meta) of a dataset prepared by nanoGPT: its meta.pkl's characters (read as
    plain data, never as code), or GPT-2's BPE when there is no meta.pkl, as nanoGPT's OpenWebText has none."""
    if not os.path.exists(path):
        if is_rank_0():  # the other ranks would say the same
            print(f"dataset {name}: nanoGPT's layout without meta.pkl: read as GPT-2's BPE token ids (uint16)")
        return b"", {"vocab_size": 50257, "tokenizer": "gpt2", "dtype": "uint16"}
    try:
        with open(path, "rb") as f:
            data = f.read()
        pkl = _PlainData(io.BytesIO(data)).load()
        chars = [pkl["itos"][i] for i in range(pkl["vocab_size"])]
        assert all(isinstance(c, str) for c in chars)
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, KeyError, TypeError, AssertionError) as e:
        raise ConfigError(f"dataset {name}: {path} is not nanoGPT's meta.pkl ({type(e).__name__}: {e})") from None
    return data, {"vocab_size": len(chars), "chars": chars, "dtype": "uint16"}


def checkpoint_vocab(state, path, dataset=""):
    """The vocabulary to decode a checkpoint's ids with (meta, as meta.json says it): the checkpoint's own, or for
    nanoGPT's character-level ckpt.pt at `path`, the meta.pkl of its dataset, where nanoGPT's sample.py finds it:
    data/<its config's dataset>/ in the current folder, or beside the checkpoint's folder (nanoGPT's out_dir sits
    beside its data/). `dataset`, a name or a folder (as train.py's), says where instead; it is for that case only."""
    meta = state["meta"]
    if state.get("origin") != "nanoGPT" or "chars" in meta or "tokenizer" in meta:
        if dataset:
            raise ConfigError(f"--dataset is for nanoGPT's character-level checkpoints, whose characters are in "
                              f"their dataset's meta.pkl: {path} carries its vocabulary")
        return meta
    name = dataset or state.get("dataset")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{path} is nanoGPT's, of {meta['vocab_size']} characters, and its config names no "
                          f"dataset: pass --dataset=<the folder of its meta.pkl>")
    if dataset and (os.sep in dataset or dataset.startswith(".")):
        folders = [dataset]
    else:
        beside = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), "data", name)
        folders = [os.path.join("data", name)]
        folders += [beside] if os.path.abspath(beside) != os.path.abspath(folders[0]) else []
    found = [f for f in folders if os.path.isfile(os.path.join(f, "meta.pkl"))]
    if not found:
        raise ConfigError(f"{path} is nanoGPT's, of {meta['vocab_size']} characters, kept in its dataset's meta.pkl: "
                          f"none in {' or '.join(folders)}; pass --dataset=<the dataset's name, or its folder>")
    pkl = os.path.join(found[0], "meta.pkl")
    vocab = nanogpt_meta(name, pkl)[1]
    if vocab["vocab_size"] != meta["vocab_size"]:
        raise ConfigError(f"{pkl} holds {vocab['vocab_size']} characters, {path}'s model {meta['vocab_size']}: "
                          f"not its vocabulary; pass --dataset=<the folder of the meta.pkl it was trained with>")
    print(f"vocabulary: the {vocab['vocab_size']} characters of {pkl} (nanoGPT's meta.pkl)", file=sys.stderr)
    return vocab


def model_vocab_size(cfg, meta, init_vocab=None, log=print):
    """The model's vocabulary size: the config's, or the dataset's; never smaller than the dataset's. init_vocab,
    init_from's vocabulary (meta's "chars" or "tokenizer"), gets a warning when it is not the dataset's."""
    vocab_size = cfg["vocab_size"] or meta["vocab_size"]
    if vocab_size < meta["vocab_size"]:
        whose = " (init_from's model)" if init_vocab else ""
        raise ConfigError(f"vocab_size={vocab_size}{whose} is smaller than dataset {cfg['dataset']}'s "
                          f"{meta['vocab_size']}")
    words = ("chars", "tokenizer")
    if init_vocab and not any(k in init_vocab for k in words):  # nanoGPT's characters are in its meta.pkl
        log(f"note: init_from's checkpoint does not carry its vocabulary (nanoGPT's is in its dataset's meta.pkl): "
            f"nothing checks that dataset {cfg['dataset']}'s token ids mean what they meant to these weights")
    elif init_vocab and [init_vocab.get(k) for k in words] != [meta.get(k) for k in words]:
        log(f"warning: dataset {cfg['dataset']}'s vocabulary is not init_from's: the weights will read its token "
            f"ids as other characters or words")
    return vocab_size


def fingerprint_cache(folder):
    """Where the whole-file hashes of the dataset in `folder` are remembered: its fingerprints.json when the folder
    is ours (it has meta.json); else, as for a folder nanoGPT prepared, which we only read, a file of ours named by
    the folder's absolute path under $XDG_CACHE_HOME (~/.cache)/gpt-resume/fingerprints/."""
    if os.path.exists(os.path.join(folder, "meta.json")):
        return os.path.join(folder, "fingerprints.json")
    key = hashlib.sha256(os.path.abspath(folder).encode()).hexdigest()[:32]
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache_home, "gpt-resume", "fingerprints", f"{key}.json")


def whole_file_hashes(folder, paths):
    """{"<file> sha256": hash of every byte} for these files. Hashing 17 GB takes a minute, so a hash is computed
    once and remembered (fingerprint_cache) by the file's identity (device, inode, size, mtime and ctime: a write
    changes ctime, which no tool can set back); where we cannot write, every start hashes again."""
    cache_path = fingerprint_cache(folder)
    try:
        with open(cache_path) as f:
            cache = json.load(f)
        assert isinstance(cache, dict)
    except (OSError, ValueError, AssertionError):
        cache = {}
    hashes, changed = {}, False
    for path in paths:
        st = os.stat(path)
        identity = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
        name = os.path.basename(path)
        entry = cache.get(name)
        if not (isinstance(entry, dict) and entry.get("identity") == identity):
            digest, buf = hashlib.sha256(), bytearray(8 << 20)
            with open(path, "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    digest.update(memoryview(buf)[:n])
            entry = {"identity": identity, "sha256": digest.hexdigest()}
            cache[name] = entry
            changed = True
        hashes[f"{name} sha256"] = entry["sha256"]
    if changed:
        try:  # under a temporary name of its own, so that ranks preparing together never read half a file
            os.makedirs(os.path.dirname(cache_path), exist_ok=True)
            tmp = f"{cache_path}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(cache, f)
            os.replace(tmp, cache_path)
        except OSError:
            pass  # a read-only dataset: hashed again next time
    return hashes


def batch_starts(seed, stream, step, rows, n_tokens, block_size):
    """Where each row of the global batch of `step` starts: a pure function of the arguments, so every rank
    and every resumed run draws exactly the same global batch."""
    return np.random.default_rng([seed, stream, step]).integers(0, n_tokens - block_size, size=rows)


def get_batch(data, starts, block_size, device):
    """x, y: (len(starts), block_size) int64 token ids on device; y is x shifted by one."""
    x = torch.from_numpy(np.stack([data[i:i + block_size] for i in starts]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size] for i in starts]).astype(np.int64))
    if device.type == "cuda":  # pinned memory lets the copy overlap with compute
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def micro_seed(seed, step, micro_step):
    """The dropout seed of one micro-step, the same whichever rank runs it and however the run was resumed."""
    return int(np.random.SeedSequence([seed, DROPOUT_STREAM, step, micro_step]).generate_state(1, np.uint64)[0])
