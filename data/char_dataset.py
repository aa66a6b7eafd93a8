"""
Shared by the character-level prepare.py scripts: turn a text into train.bin, val.bin and meta.json.
Files are written under temporary names and renamed, so a run that starts while another prepares the same
dataset (two torchrun ranks, say) never reads half a file.
"""
import json
import os

import numpy as np


def write_char_dataset(text, folder):
    chars = sorted(set(text))
    if len(chars) > 65535:
        raise SystemExit(f"{len(chars)} distinct characters do not fit in uint16 token ids")
    stoi = {ch: i for i, ch in enumerate(chars)}
    ids = np.array([stoi[ch] for ch in text], dtype=np.uint16)
    n = int(0.9 * len(ids))  # the first 90% trains, the last 10% validates
    meta = {"vocab_size": len(chars), "chars": chars}
    for name, write in (("train.bin", ids[:n].tofile), ("val.bin", ids[n:].tofile),
                        ("meta.json", lambda p: open(p, "w").write(json.dumps(meta)))):
        tmp = os.path.join(folder, f"{name}.tmp{os.getpid()}")
        write(tmp)
        os.replace(tmp, os.path.join(folder, name))
    print(f"{len(text):,} characters, vocabulary of {len(chars)}: {n:,} train and {len(ids) - n:,} val tokens in {folder}")
