"""
Sample text from a model: by default (init_from=resume) the checkpoint of any step of the run in out_dir,

    python sample.py --out_dir=out --from_checkpoint_step=2000 --start="ROMEO:" --num_samples=3

or, as nanoGPT's sample.py does, GPT-2's released weights (--init_from=gpt2, gpt2-medium, gpt2-large or gpt2-xl,
through huggingface_hub), or what train.py's init_from takes: a Hugging Face GPT-2 folder (export.py's too), a
checkpoint file (nanoGPT's ckpt.pt too), or another out_dir, with :STEP for a step other than the newest.

The vocabulary comes with the weights: a checkpoint carries its dataset's meta.json (characters, or GPT-2's BPE
through tiktoken), a Hugging Face folder its tokenizer.json (hf_gpt2.load_hf_vocab), GPT-2's weights GPT-2's BPE;
nanoGPT's character-level ckpt.pt has its characters in its dataset's meta.pkl, found where nanoGPT's sample.py
finds it, or in --dataset's folder (dataset.checkpoint_vocab). A temperature that would make the logits overflow,
or vanish, is refused before sampling (check_temperature).
An out_dir with nanoGPT's ckpt.pt and no checkpoint of ours samples from it, as nanoGPT's sample.py does; one with
neither is an error that names a folder beside it, with a similar name, that has checkpoints (did you mean
out-shakespeare-char-cpu, for out-shakespeare-char?).
"""
import math
import os
import sys

import torch

import checkpoint
from configurator import ConfigError, check_ranges, parse
from dataset import checkpoint_vocab
from device import DTYPES, check_device, setup_runtime
from hf_gpt2 import GPT2_HUB_NAMES, PretrainedError, load_hf_gpt2, load_hf_vocab
from stops import run_main

CONFIG = [  # (key, default, what it sets); `python sample.py --help` prints this table
    ("init_from", "resume", "resume: out_dir's checkpoint; gpt2[-medium|-large|-xl]: GPT-2's weights; or a "
                            "Hugging Face GPT-2 folder, a checkpoint file, or an out_dir[:STEP]"),
    ("out_dir", "out", "init_from=resume: the folder of the run's ckpt_<step>.pt files"),
    ("from_checkpoint_step", -1, "init_from=resume: -1, the newest good checkpoint; N: exactly step N"),
    ("start", "\n", "the prompt; FILE:path reads it from a file"),
    ("num_samples", 3, "samples to draw"),
    ("max_new_tokens", 500, "tokens per sample"),
    ("temperature", 0.8, "1.0 samples the model's distribution; lower is more conservative"),
    ("top_k", 200, "sample among the k likeliest tokens only; 0 disables"),
    ("device", "auto", "auto (cuda when available, else cpu), cpu, cuda, cuda:N or mps"),
    ("dtype", "auto", "auto (bfloat16 on a GPU that has it, else float16; float32 on CPU), float32, bfloat16 "
                      "or float16"),
    ("seed", 1337, "seeds the sampling"),
    ("dataset", "", "nanoGPT's character-level ckpt.pt only: the dataset (a name under data/, or a folder) whose "
                    "meta.pkl holds its characters; '': the one its config names"),
]


def read_run(out_dir, step):
    """(state, what it is, its path) of the checkpoint of `step` in out_dir: -1, the newest good one, or nanoGPT's
    ckpt.pt in a folder that has no checkpoint of ours, as nanoGPT's sample.py reads it."""
    nanogpt = os.path.join(out_dir, checkpoint.NANOGPT_NAME)
    if step == -1 and not checkpoint.list_steps(out_dir) and os.path.isfile(nanogpt):
        return checkpoint.load(nanogpt), f"{nanogpt} (nanoGPT's)", nanogpt
    step, state = checkpoint.find_to_read(out_dir, step, "sample from")
    return state, checkpoint.path_for(out_dir, step), checkpoint.path_for(out_dir, step)


def load_weights(cfg, given):
    """(a checkpoint's state, or its likes: model_args, model and meta; what it is; its path) of init_from."""
    source = cfg["init_from"]
    if source == "resume":
        return read_run(cfg["out_dir"], cfg["from_checkpoint_step"])
    if given & {"out_dir", "from_checkpoint_step"}:
        raise ConfigError(f"init_from={source} reads no out_dir: --out_dir and --from_checkpoint_step go with "
                          f"init_from=resume (or pass --init_from=OUT_DIR:STEP)")
    if source in GPT2_HUB_NAMES or os.path.isfile(os.path.join(source, "config.json")):
        try:
            model_args, weights = load_hf_gpt2(source)
        except PretrainedError as e:
            raise ConfigError(f"init_from={source}: {e}") from None
        hub = source in GPT2_HUB_NAMES
        meta = {"vocab_size": 50257, "tokenizer": "gpt2"} if hub else load_hf_vocab(source, model_args["vocab_size"])
        if meta is None:
            raise ConfigError(f"init_from={source}: no vocabulary to decode with: no character-level tokenizer.json "
                              f"(export.py writes one) and, with {model_args['vocab_size']} ids, not GPT-2's BPE")
        return {"model_args": model_args, "model": weights, "meta": meta}, f"Hugging Face GPT-2 {source}", source
    if os.path.isfile(source):
        return checkpoint.load(source), source, source
    folder, colon, step = source.rpartition(":")
    if not (colon and step.isdigit()):
        folder, step = source, "-1"
    if os.path.isdir(folder):
        return read_run(folder, int(step))
    raise ConfigError(f"init_from={source}: not resume, {', '.join(GPT2_HUB_NAMES)}, a Hugging Face GPT-2 folder, "
                      f"a checkpoint file or an out_dir")


def tokenizer(meta, source):
    """(encode, decode, how many ids it decodes) for the vocabulary the weights came with: their characters, or a
    tiktoken BPE."""
    if "chars" in meta:
        stoi = {ch: i for i, ch in enumerate(meta["chars"])}

        def encode(text):
            unknown = sorted(set(text) - set(stoi))
            if unknown:
                raise ConfigError(f"start: characters outside the model's vocabulary: {''.join(unknown)!r}")
            return [stoi[ch] for ch in text]
        return encode, lambda ids: "".join(meta["chars"][i] for i in ids), len(meta["chars"])
    if "tokenizer" not in meta:  # a dataset's meta.json may give vocab_size alone
        raise ConfigError(f"{source} holds no vocabulary to decode with (its dataset's meta.json gave no "
                          f"characters and no tokenizer's name)")
    import tiktoken  # only BPE vocabularies need it
    try:
        enc = tiktoken.get_encoding(meta["tokenizer"])
    except Exception as e:  # offline with an empty cache: requests' errors; an unknown name: ValueError
        raise ConfigError(f"cannot load the {meta['tokenizer']} BPE through tiktoken ({type(e).__name__}); "
                          f"offline, give tiktoken its files through TIKTOKEN_CACHE_DIR (docs/data.md)") from None
    # n_vocab, not meta's vocab_size: a nanoGPT checkpoint's is the model's, 50304 when padded for speed
    return (lambda text: enc.encode(text, allowed_special={"<|endoftext|>"})), enc.decode, enc.n_vocab


def logit_bound(model, n_vocab):
    """A bound on the size of any logit the model gives the first n_vocab ids: ln_f's normalized input has norm at
    most sqrt(n_embd), so logit i is at most sqrt(n_embd) |w_i * gain| + |w_i . bias|, w_i lm_head's row i; 2%
    more for the rounding of a 16-bit autocast."""
    ln_f, w = model.transformer.ln_f, model.lm_head.weight.detach()[:n_vocab].float()
    bound = math.sqrt(w.size(1)) * (w * ln_f.weight.detach().float()).norm(dim=1)
    if ln_f.bias is not None:
        bound += (w @ ln_f.bias.detach().float()).abs()
    return 1.02 * bound.max().item()


def check_temperature(temperature, bound, dtype, source):
    """Refuse a temperature that makes sampling overflow or lose the logits. It divides them in the autocast dtype:
    below bound/max one can overflow to inf (and softmax gives nan), above bound/tiny every one falls below the
    normal numbers (the distribution, and top_k's choice, are lost); and it must be a normal float32 itself."""
    info, single = torch.finfo(DTYPES[dtype]), torch.finfo(torch.float32)
    if not math.isfinite(bound):
        raise ConfigError(f"{source}: the model's weights are not all finite: its logits would be inf or nan")
    low, high = max(bound / info.max, single.tiny), min(bound / info.tiny if bound else single.max, single.max)
    logits = f"this model's logits, up to {bound:.3g} in size (a bound from its weights), divided by it"
    if temperature < bound / info.max:
        why = f"{logits} can overflow {dtype}"
    elif temperature < single.tiny:
        why = f"it is below float32's normal numbers ({single.tiny:.3g}): dividing by it is dividing by about zero"
    elif temperature > high:
        why = f"{logits} all underflow {dtype}: sampling would be uniform, top_k ignored"
    else:
        return
    raise ConfigError(f"temperature={temperature}: {why}; sampling needs {low:.3g} <= temperature <= {high:.3g}")


def read_prompt(start):
    if not start.startswith("FILE:"):
        return start
    try:
        with open(start[5:], encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"start: cannot read {start[5:]}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"start: {start[5:]} is not UTF-8 text (byte {e.start}: {e.reason})") from None


def main(argv):
    cfg, given = parse(CONFIG, argv)
    check_device(cfg["device"], cfg["dtype"])
    check_ranges(cfg, positive=("num_samples", "max_new_tokens"))
    if not 0 <= cfg["seed"] < 2 ** 63:  # what torch.manual_seed takes, and train.py's seeds
        raise ConfigError(f"seed must be in [0, 2**63), got {cfg['seed']}")
    if cfg["temperature"] <= 0.0 or cfg["top_k"] < 0:
        raise ConfigError(f"temperature must be positive and top_k not negative, got {cfg['temperature']} "
                          f"and {cfg['top_k']}")
    start = read_prompt(cfg["start"])
    state, source, path = load_weights(cfg, given)
    encode, decode, n_vocab = tokenizer(checkpoint_vocab(state, path, cfg["dataset"]), source)
    ids = encode(start)
    if not ids:
        raise ConfigError("start: the prompt is empty; give at least one token")

    device, dtype, autocast = setup_runtime(cfg["device"], cfg["dtype"])
    model = checkpoint.model_of(state, source)
    check_temperature(cfg["temperature"], logit_bound(model, n_vocab), dtype, source)
    model.eval().to(device)
    torch.manual_seed(cfg["seed"])  # after the model's random init, so that the samples depend on its weights alone
    print(f"sampling from {source}", file=sys.stderr)
    x = torch.tensor(ids, dtype=torch.long, device=device)[None, ...]  # (1, t)
    with autocast:
        for _ in range(cfg["num_samples"]):
            y = model.generate(x, cfg["max_new_tokens"], temperature=cfg["temperature"], top_k=cfg["top_k"] or None,
                               vocab_size=n_vocab)
            print(decode(y[0].tolist()))
            print("---------------")


if __name__ == "__main__":
    run_main(main, (checkpoint.CheckpointError,))
