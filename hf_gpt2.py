"""
GPT-2 weights to and from Hugging Face's format, for init_from (train.py) and export.py. load_hf_gpt2 reads a
hub name or a folder (config.json with model.safetensors or pytorch_model.bin) into our names and shapes;
to_hf_gpt2 turns our state dict into a GPT2LMHeadModel's, which transformers loads as it is. Both speak plain
{name: tensor} dicts, and a small safetensors reader and writer needs no package. A character-level vocabulary
goes out as a tokenizer.json (char_tokenizer) and comes back with load_hf_vocab. PretrainedError is one line.
from_nanogpt reads the other GPT-2 trainer's format: nanoGPT's ckpt.pt, as checkpoint.load gives it to readers.
"""
import json
import mmap
import os
import struct

import torch

from model import SHAPE_KEYS

GPT2_HUB_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
# The name mapping, both ways: HF's GPT-2 names are ours, "transformer." dropped in files saved from GPT2Model (the
# hub's are); HF's Conv1D stores these four weights as (in, out) where our nn.Linear has (out, in).
HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}


class PretrainedError(ValueError):
    """A model folder or hub name that cannot be loaded; the scripts print it as one line."""


def load_safetensors(path):
    """{name: tensor} of a .safetensors file (8-byte little-endian header length, a JSON header, the tensors'
    bytes), mapped copy-on-write: a tensor's pages are read when it is used."""
    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        (n,) = struct.unpack("<Q", buf[:8])
        tensors = {}
        for name, info in json.loads(buf[8:8 + n]).items():
            if name != "__metadata__":
                dtype, (start, end) = SAFETENSORS_DTYPES[info["dtype"]], info["data_offsets"]
                if not 0 <= start <= end <= len(buf) - 8 - n:
                    raise ValueError(f"{name}'s data lies past the end of the file")
                t = torch.frombuffer(buf, dtype=dtype, count=(end - start) // dtype.itemsize, offset=8 + n + start) \
                    if end > start else torch.empty(0, dtype=dtype)  # frombuffer refuses count=0
                tensors[name] = t.view(info["shape"])
    except OSError as e:
        raise PretrainedError(f"cannot read {path}: {e.strerror}") from None
    except (ValueError, KeyError, TypeError, RuntimeError, struct.error) as e:
        raise PretrainedError(f"{path} is not a safetensors file this reader handles ({type(e).__name__}: {e})") \
            from None
    return tensors


def save_safetensors(tensors, path, metadata=None):
    """Write {name: tensor} to path as a .safetensors file, fsynced."""
    code, header, offset = {d: c for c, d in SAFETENSORS_DTYPES.items()}, {}, 0
    for name, t in tensors.items():
        header[name] = {"dtype": code[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    head = json.dumps(header | ({"__metadata__": metadata} if metadata else {})).encode()
    head += b" " * (-len(head) % 8)  # trailing spaces, as the format allows: each tensor's data stays 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for t in tensors.values():
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        f.flush()
        os.fsync(f.fileno())


def gpt2_shapes(model_args):
    """{our name: shape} of every parameter of a GPT-2 of this shape, biases included (GPT-2 always has them),
    lm_head left out (it is wte's matrix)."""
    n, v, t = model_args["n_embd"], model_args["vocab_size"], model_args["block_size"]
    shapes = {"transformer.wte.weight": (v, n), "transformer.wpe.weight": (t, n)}
    for i in range(model_args["n_layer"]):
        for module, out, into in (("ln_1", n, 0), ("attn.c_attn", 3 * n, n), ("attn.c_proj", n, n), ("ln_2", n, 0),
                                  ("mlp.c_fc", 4 * n, n), ("mlp.c_proj", n, 4 * n)):
            shapes[f"transformer.h.{i}.{module}.weight"] = (out, into) if into else (out,)
            shapes[f"transformer.h.{i}.{module}.bias"] = (out,)
    return shapes | {"transformer.ln_f.weight": (n,), "transformer.ln_f.bias": (n,)}


def load_hf_gpt2(source):
    """(model_args, state_dict) of a Hugging Face GPT-2, for GPT(GPTConfig(**model_args)).load_state_dict(state_dict).
    source: a name in GPT2_HUB_NAMES, downloaded with huggingface_hub (pass ./gpt2 for a folder of that name), or a
    folder holding config.json and model.safetensors or pytorch_model.bin. GPT-2's MLP has the tanh approximation of
    GELU (gelu_new), ours the exact GELU: as in nanoGPT, logits differ a little. PretrainedError, one line, for what
    cannot be loaded."""
    folder = _hub_download(source) if source in GPT2_HUB_NAMES else source
    path = os.path.join(folder, "config.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise PretrainedError(f"cannot read {path} ({getattr(e, 'strerror', None) or e}): a Hugging Face GPT-2 "
                              f"folder holds config.json and model.safetensors or pytorch_model.bin") from None
    kind = cfg.get("model_type") if isinstance(cfg, dict) else None
    if kind != "gpt2":
        raise PretrainedError(f"{path}: model_type is {kind!r}, not 'gpt2'")
    # what else a GPT-2's config may say that this model does not compute (it takes any GELU for GPT-2's)
    ours = dict(layer_norm_epsilon=1e-5, scale_attn_weights=True, tie_word_embeddings=True,
                scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False)
    odd = [f"{k}={cfg[k]!r}" for k, v in ours.items() if cfg.get(k, v) != v]
    if cfg.get("activation_function", "gelu_new") not in ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        odd.append(f"activation_function={cfg['activation_function']!r}")
    if odd:
        raise PretrainedError(f"{path}: {', '.join(odd)}: this model cannot compute that")
    try:
        model_args = dict(n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"],
                          block_size=cfg["n_positions"], bias=True, vocab_size=cfg["vocab_size"], dropout=0.0)
    except KeyError as e:
        raise PretrainedError(f"{path} has no {e.args[0]}") from None
    if model_args["n_embd"] % model_args["n_head"]:
        raise PretrainedError(f"{path}: n_embd={cfg['n_embd']} is not divisible by n_head={cfg['n_head']}")

    weights = os.path.join(folder, "model.safetensors")
    if os.path.exists(weights):
        hf = load_safetensors(weights)
    elif os.path.exists(weights := os.path.join(folder, "pytorch_model.bin")):
        try:
            hf = torch.load(weights, map_location="cpu", weights_only=True)  # no mmap: the hub's are pre-zip files
        except Exception as e:  # weights_only refuses anything but tensors and plain data
            raise PretrainedError(f"cannot load {weights}: {str(e).splitlines()[0]}") from None
    else:
        raise PretrainedError(f"{folder} has no model.safetensors or pytorch_model.bin")
    # attn.bias and attn.masked_bias are the buffers of HF's attention mask; lm_head.weight is wte's matrix
    hf = {k.removeprefix("transformer."): v for k, v in hf.items()
          if not k.endswith((".attn.bias", ".attn.masked_bias")) and k != "lm_head.weight"}
    sd = {}
    for name, shape in gpt2_shapes(model_args).items():
        key, transposed = name.removeprefix("transformer."), name.endswith(HF_TRANSPOSED)
        t, want = hf.pop(key, None), shape[::-1] if transposed else shape
        if t is None:
            raise PretrainedError(f"{weights} lacks {key}")
        if t.shape != want:
            raise PretrainedError(f"{weights}: {key} has shape {tuple(t.shape)}; config.json implies {tuple(want)}")
        sd[name] = t.t() if transposed else t
    if hf:
        raise PretrainedError(f"{weights} holds what a GPT-2 has not: {', '.join(sorted(hf)[:3])}")
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return model_args, sd


def _hub_download(name):
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise PretrainedError(f"{name} is on the Hugging Face hub: pip install huggingface_hub, or pass a local "
                              f"folder holding the model") from None
    try:  # the hub's four GPT-2s all have model.safetensors: allowing pytorch_model.bin would double the download
        return snapshot_download(f"openai-community/{name}", allow_patterns=["config.json", "model.safetensors"])
    except Exception as e:  # offline, or refused: huggingface_hub has many exception types
        raise PretrainedError(f"cannot download {name} from the Hugging Face hub ({type(e).__name__}): check the "
                              f"network, or pass a folder holding its config.json and model.safetensors (offline: "
                              f"docs/gpt2.md)") from None


def to_hf_gpt2(state_dict, model_args):
    """(state dict, config.json dict) of a Hugging Face GPT2LMHeadModel that computes what our model does: Conv1D
    weights transposed, the tied matrix once as transformer.wte.weight, zero biases where our model has none, and
    activation_function "gelu", the exact GELU of our MLP."""
    tensors = {}
    for name, shape in gpt2_shapes(model_args).items():
        if name not in state_dict and name.endswith(".bias"):
            tensors[name] = torch.zeros(shape)  # no bias is a zero bias
        else:
            tensors[name] = (state_dict[name].t() if name.endswith(HF_TRANSPOSED) else state_dict[name]).contiguous()
    d, n_positions = model_args["dropout"], model_args["block_size"]
    config = dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", n_layer=model_args["n_layer"],
                  n_head=model_args["n_head"], n_embd=model_args["n_embd"], n_positions=n_positions, n_ctx=n_positions,
                  vocab_size=model_args["vocab_size"], activation_function="gelu", layer_norm_epsilon=1e-5,
                  resid_pdrop=d, embd_pdrop=d, attn_pdrop=d, initializer_range=0.02, tie_word_embeddings=True)
    return tensors, config


def char_tokenizer(chars):
    """tokenizer.json, Hugging Face tokenizers' format, of a character-level vocabulary in which id i is chars[i]:
    a BPE with no merges splits text into its characters, each mapped to its id (one not in the vocabulary is
    dropped), and the Fuse decoder joins them with nothing between. PreTrainedTokenizerFast (AutoTokenizer) loads
    it, and plain JSON reads it: model.vocab is {character: id}."""
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
            "pre_tokenizer": None, "post_processor": None, "decoder": {"type": "Fuse"},
            "model": {"type": "BPE", "vocab": {ch: i for i, ch in enumerate(chars)}, "merges": []}}


def load_hf_vocab(folder, vocab_size):
    """The vocabulary of a Hugging Face GPT-2 folder whose model has vocab_size ids, as a dataset's meta.json
    says it: the characters of a tokenizer.json char_tokenizer wrote, else GPT-2's BPE for a model of 50257 ids or
    more (GPT-2's own, and any export of a run on GPT-2's BPE); None when it is neither."""
    try:
        with open(os.path.join(folder, "tokenizer.json"), encoding="utf-8") as f:
            model = json.load(f)["model"]
        vocab, merges = model["vocab"], model["type"] != "BPE" or model["merges"]
        chars = sorted(vocab, key=vocab.get)
        ids_in_order = [vocab[ch] for ch in chars] == list(range(len(chars)))
        if not merges and 0 < len(chars) <= vocab_size and all(len(ch) == 1 for ch in chars) and ids_in_order:
            return {"vocab_size": len(chars), "chars": chars}
    except (OSError, ValueError, KeyError, TypeError):  # no tokenizer.json, or another kind: not a character one
        pass
    return {"vocab_size": 50257, "tokenizer": "gpt2"} if vocab_size >= 50257 else None


def from_nanogpt(state):
    """nanoGPT's ckpt.pt (iter_num, model_args, _orig_mod. names) as a reader sees ours: clean names, its step, the
    vocabulary's size (50257 or more is GPT-2's BPE; nanoGPT keeps characters in the meta.pkl of its dataset, which
    its config names: "dataset", for dataset.checkpoint_vocab)."""
    args, config = state["model_args"], state.get("config")
    weights = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in state["model"].items()
               if not (k.endswith("attn.bias") and v.dim() == 4)}  # the causal mask of its non-flash attention
    shape = {k: args[k] for k in SHAPE_KEYS}
    meta = {"vocab_size": args["vocab_size"]} | ({"tokenizer": "gpt2"} if args["vocab_size"] >= 50257 else {})
    return {"model": weights, "model_args": shape | {"dropout": args.get("dropout", 0.0)},
            "step": state["iter_num"], "meta": meta, "origin": "nanoGPT",
            "dataset": config.get("dataset") if isinstance(config, dict) else None}
