"""
Shared by the prepare.py scripts: the text to prepare (--input=FILE, input.txt beside the script, or a
download), and for the character-level ones, that text as train.bin, val.bin and meta.json.
Token ids are uint16 when the vocabulary fits, else uint32; meta.json's "dtype" says which.
Every file is written under a temporary name and renamed, meta.json last: its presence marks the dataset
complete, so a run that starts while another prepares the same dataset (two torchrun ranks, say) never
reads half a dataset.
"""
import json
import os
import sys
import urllib.request

import numpy as np

TINYSHAKESPEARE = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def read_text(here, url, argv):
    """The text a prepare.py in folder `here` was given: `--input=FILE` in argv, else input.txt beside it, which
    is downloaded from url the first time. A problem ends the script with one line."""
    if argv and not (len(argv) == 1 and argv[0].startswith("--input=")):
        sys.exit("usage: python prepare.py [--input=FILE]")
    path = argv[0][len("--input="):] if argv else os.path.join(here, "input.txt")
    if not os.path.exists(path):
        if argv:
            sys.exit(f"error: --input file {path} does not exist")
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                data = r.read()
            data.decode("utf-8")  # checked before it is saved, so a bad download does not stay behind as input.txt
        except (OSError, UnicodeDecodeError) as e:  # the command, not a flag: train.py runs this script too
            sys.exit(f"error: cannot download {url} ({e}): put the text in {path}, or run python {sys.argv[0]} "
                     f"--input=FILE")
        write_atomically(path, data)  # a download cut short, or a concurrent one, never leaves half an input.txt
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        sys.exit(f"error: cannot read {path} as UTF-8 text: {e}")


def write_atomically(path, data):
    """Writes bytes under a temporary name then renames, so a reader sees all of the file or none of it; the
    pid in the name keeps two concurrent writers off each other's temporary file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # as checkpoints are: a crash never leaves a renamed file with no bytes
    os.replace(tmp, path)


def write_char_dataset(text, folder):
    chars = sorted(set(text))
    dtype = "uint16" if len(chars) <= 2 ** 16 else "uint32"  # every Unicode code point fits in uint32
    stoi = {ch: i for i, ch in enumerate(chars)}
    ids = np.array([stoi[ch] for ch in text], dtype=dtype)
    n = int(0.9 * len(ids))  # the first 90% trains, the last 10% validates
    write_atomically(os.path.join(folder, "train.bin"), ids[:n].tobytes())
    write_atomically(os.path.join(folder, "val.bin"), ids[n:].tobytes())
    meta = {"vocab_size": len(chars), "chars": chars, "dtype": dtype}
    write_atomically(os.path.join(folder, "meta.json"), json.dumps(meta).encode())
    print(f"{len(text):,} characters, vocabulary of {len(chars)}: {n:,} train and {len(ids) - n:,} val tokens "
          f"in {folder}")
