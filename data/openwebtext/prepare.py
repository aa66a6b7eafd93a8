"""
OpenWebText (about 9B GPT-2 tokens) for config/train_gpt2.py. Needs network and `pip install datasets`;
writes train.bin (~17 GB) and val.bin as uint16 GPT-2 token ids, each document ended by <|endoftext|>.
"""
import json
import os
import sys

import numpy as np
import tiktoken
from datasets import load_dataset

NUM_PROC = max(1, os.cpu_count() // 2)
here = os.path.dirname(os.path.abspath(__file__))
try:
    enc = tiktoken.get_encoding("gpt2")  # downloads GPT-2's vocabulary on first use, then reads tiktoken's cache
except Exception as e:  # requests' errors when offline with an empty cache
    sys.exit(f"error: cannot load GPT-2's BPE through tiktoken ({type(e).__name__}): it downloads two files on first "
             f"use; offline, copy them into a folder and set TIKTOKEN_CACHE_DIR to it (docs/data.md, Offline)")

split = load_dataset("openwebtext", num_proc=NUM_PROC)["train"]
split = split.train_test_split(test_size=0.0005, seed=2357, shuffle=True)
split["val"] = split.pop("test")


def tokenize(example):
    ids = enc.encode_ordinary(example["text"]) + [enc.eot_token]
    return {"ids": ids, "len": len(ids)}


for name, dset in split.items():
    tokenized = dset.map(tokenize, remove_columns=["text"], num_proc=NUM_PROC, desc=f"tokenizing {name}")
    total = int(np.sum(tokenized["len"], dtype=np.uint64))
    tmp = os.path.join(here, f"{name}.bin.tmp{os.getpid()}")  # the pid: concurrent preparers never share one
    out = np.memmap(tmp, dtype=np.uint16, mode="w+", shape=(total,))
    pos = 0
    for shard in range(1024):  # in shards, so the whole split never sits in memory at once
        ids = np.concatenate(tokenized.shard(num_shards=1024, index=shard, contiguous=True).with_format("numpy")["ids"])
        out[pos:pos + len(ids)] = ids
        pos += len(ids)
    out.flush()
    os.replace(tmp, os.path.join(here, f"{name}.bin"))
    print(f"{name}: {total:,} tokens")
# meta.json last, also renamed into place: its presence marks the dataset complete
tmp = os.path.join(here, f"meta.json.tmp{os.getpid()}")
with open(tmp, "w") as f:
    json.dump({"vocab_size": enc.n_vocab, "tokenizer": "gpt2", "dtype": "uint16"}, f)
    f.flush()
    os.fsync(f.fileno())
os.replace(tmp, os.path.join(here, "meta.json"))
