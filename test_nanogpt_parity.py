"""
Parity with nanoGPT (every test here is marked `parity`: it pins nanoGPT's checkpoint, data or config layout, and a
fork that changes them rightly breaks it; docs/tests.md):  python3 -m pytest -q -n 2 test_nanogpt_parity.py
- its ckpt.pt starts a run through init_from; a dataset it prepared (meta.pkl, or none for GPT-2's BPE) trains as
  it is, and a meta.pkl that would run code is refused;
- its config files run unchanged, every key meaning the same here (decay_lr=False keeps the learning rate).
"""
import os
import pickle

import numpy as np
import pytest
import torch

import checkpoint
from configurator import ConfigError
from conftest import read_metrics, run, state_at, write_tokens
from model import GPT, GPTConfig


@pytest.mark.parity
def test_a_nanogpt_checkpoint_starts_a_run(tmp_path, dataset, capsys):
    """nanoGPT's ckpt.pt (iter_num, model_args, torch.compile's _orig_mod. names) as init_from, a file or its
    out_dir: its weights start the run, and the run says where they came from; checkpoint.py and a plain start
    in that folder point at it."""
    args = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, bias=False, vocab_size=100, dropout=0.0)
    torch.manual_seed(5)
    weights = GPT(GPTConfig(**args)).state_dict()
    nano = tmp_path / "out-nano"
    nano.mkdir()
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in weights.items()}, "optimizer": {}, "model_args": args,
                "iter_num": 250, "best_val_loss": torch.tensor(1.5), "config": {"batch_size": 12}}, nano / "ckpt.pt")
    assert f"python train.py --init_from={nano / 'ckpt.pt'}" in checkpoint.describe(str(nano))[0]
    for source in (nano / "ckpt.pt", nano):
        out = tmp_path / f"from-{source.name}"
        run(out, dataset, f"--init_from={source}", "--max_iters=1", "--learning_rate=0.0", "--vocab_size=100")
        assert f"starting fresh from the weights of {source} (nanoGPT's step 250)" in capsys.readouterr().out
        assert all(torch.equal(state_at(out, 1)["model"][k], v) for k, v in weights.items())  # lr 0: unchanged
    run(nano, dataset, "--max_iters=1", "--vocab_size=100")
    assert f"({nano / 'ckpt.pt'} is nanoGPT's: init_from={nano / 'ckpt.pt'} starts from it)" in capsys.readouterr().out


class _Exploit:
    def __reduce__(self):
        return os.system, ("touch pwned",)


@pytest.mark.parity
def test_a_nanogpt_prepared_dataset_trains_as_it_is(tmp_path, capsys):
    """nanoGPT's layout: train.bin and val.bin with meta.pkl (characters, read as plain data, never as code), or
    with no meta at all (GPT-2's BPE, as its OpenWebText). A meta.pkl that would run code is refused in one line."""
    chars = sorted(set("hello nanoGPT world"))
    ids = np.random.default_rng(0).integers(0, len(chars), 5000).astype(np.uint16)
    chars_data, bpe_data, evil = tmp_path / "chars", tmp_path / "bpe", tmp_path / "evil"
    for folder in (chars_data, bpe_data, evil):
        write_tokens(folder, ids, {})
        (folder / "meta.json").unlink()
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)}}
    (chars_data / "meta.pkl").write_bytes(pickle.dumps(meta))
    run(tmp_path / "out-chars", str(chars_data), "--max_iters=2")
    assert state_at(tmp_path / "out-chars", 2)["meta"]["chars"] == chars
    run(tmp_path / "out-bpe", str(bpe_data), "--max_iters=1", "--n_embd=16", "--n_head=1", "--n_layer=1")
    assert state_at(tmp_path / "out-bpe", 1)["meta"] == {"vocab_size": 50257, "tokenizer": "gpt2", "dtype": "uint16"}
    assert "nanoGPT's layout without meta.pkl: read as GPT-2's BPE" in capsys.readouterr().out
    (evil / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 3, "itos": _Exploit()}))
    with pytest.raises(ConfigError, match=r"meta.pkl is not nanoGPT's meta.pkl \(UnpicklingError: posix.system"):
        run(tmp_path / "out-evil", str(evil), "--max_iters=1")
    assert not (tmp_path / "out-evil").exists() and not os.path.exists("pwned")
    # one of ours, half-prepared (meta.json, written last, not yet there): prepared, never read as nanoGPT's
    half = tmp_path / "half"
    write_tokens(half, ids, {})
    (half / "meta.json").unlink()
    (half / "prepare.py").write_text("import json, os\nhere = os.path.dirname(os.path.abspath(__file__))\n"
                                     "json.dump({'vocab_size': 20, 'chars': [chr(65 + i) for i in range(20)]}, "
                                     "open(os.path.join(here, 'meta.json'), 'w'))\n")
    run(tmp_path / "out-half", str(half), "--max_iters=1")
    assert "chars" in state_at(tmp_path / "out-half", 1)["meta"]


NANOGPT_STYLE_CONFIG = """# in the shape of nanoGPT's config/train_shakespeare_char.py: every key its train.py knows
import time
out_dir = 'out-nanogpt'
eval_interval = 2
eval_iters = 2
log_interval = 1
always_save_checkpoint = False
wandb_log = False
wandb_project = 'shakespeare-char'
wandb_run_name = 'mini-gpt' + str(int(time.time()))
dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 4
block_size = 16
n_layer = 2
n_head = 2
n_embd = 32
dropout = 0.2
bias = False
learning_rate = 1e-3
max_iters = 4
lr_decay_iters = 4
min_lr = 1e-4
beta1 = 0.9
beta2 = 0.99
weight_decay = 1e-1
grad_clip = 1.0
decay_lr = True
warmup_iters = 1
init_from = 'scratch'
eval_only = False
backend = 'nccl'
device = 'cpu'
dtype = 'float32'
compile = False
"""


@pytest.mark.parity
def test_nanogpt_style_config_files_run_unchanged(tmp_path, dataset, capsys):
    (tmp_path / "nano.py").write_text(NANOGPT_STYLE_CONFIG)
    run(tmp_path / "out", dataset, str(tmp_path / "nano.py"), f"--dataset={dataset}", f"--out_dir={tmp_path / 'out'}")
    assert "backend='nccl' (nanoGPT's key: changes nothing here)" in capsys.readouterr().out
    # always_save_checkpoint=False saves where the val loss is the best yet, as nanoGPT does, and at the last step
    new_bests, lowest = [], float("inf")
    for m in read_metrics(tmp_path / "out"):
        if "val_loss" in m and m["val_loss"] < lowest:
            new_bests, lowest = new_bests + [m["step"]], m["val_loss"]
    assert new_bests[0] == 2 and checkpoint.list_steps(str(tmp_path / "out")) == sorted(set(new_bests) | {4})
    (tmp_path / "eval.py").write_text(f"batch_size = 4\neval_iters = 3\neval_only = True\nwandb_log = False\n"
                                      f"init_from = {str(tmp_path / 'out')!r}\n")
    run(tmp_path / "eval", dataset, str(tmp_path / "eval.py"))
    assert "(eval_only: nothing written)" in capsys.readouterr().out


@pytest.mark.parity
def test_decay_lr_false_keeps_the_learning_rate(tmp_path, dataset):
    run(tmp_path, dataset, "--max_iters=10", "--decay_lr=False", "--learning_rate=3e-3", "--log_interval=1")
    assert {m["lr"] for m in read_metrics(tmp_path) if "lr" in m} == {3e-3}
