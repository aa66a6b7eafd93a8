"""
tinyshakespeare in GPT-2's BPE (tiktoken), for finetuning GPT-2: uses input.txt beside this file when present,
else downloads it. Token ids are uint16 (GPT-2 has 50257); the first 90% of the tokens train, the rest validate.
    python data/shakespeare/prepare.py [--input=ANY_UTF8_TEXT_FILE]
"""
import json
import os
import sys

import numpy as np
import tiktoken

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # data/, for char_dataset
from char_dataset import TINYSHAKESPEARE, read_text, write_atomically

here = os.path.dirname(os.path.abspath(__file__))
text = read_text(here, TINYSHAKESPEARE, sys.argv[1:])
try:
    enc = tiktoken.get_encoding("gpt2")  # downloads GPT-2's vocabulary on first use, then reads tiktoken's cache
except Exception as e:  # requests' errors when offline with an empty cache
    sys.exit(f"error: cannot load GPT-2's BPE through tiktoken ({type(e).__name__}): it downloads two files on first "
             f"use; offline, copy them into a folder and set TIKTOKEN_CACHE_DIR to it (docs/data.md, Offline)")
ids = np.array(enc.encode_ordinary(text), dtype=np.uint16)
n = int(0.9 * len(ids))
write_atomically(os.path.join(here, "train.bin"), ids[:n].tobytes())
write_atomically(os.path.join(here, "val.bin"), ids[n:].tobytes())
meta = {"vocab_size": enc.n_vocab, "tokenizer": "gpt2", "dtype": "uint16"}
write_atomically(os.path.join(here, "meta.json"), json.dumps(meta).encode())  # last: it marks the dataset complete
print(f"{len(text):,} characters, {len(ids):,} GPT-2 tokens: {n:,} train and {len(ids) - n:,} val in {here}")
