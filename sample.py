"""
Sample text from the checkpoint of any step:

    python sample.py --out_dir=out --from_checkpoint_step=2000 --start="ROMEO:" --num_samples=3

The checkpoint carries its dataset's meta.json: a character vocabulary, or GPT-2's BPE through tiktoken.
"""
import sys

import torch

import checkpoint
from configurator import ConfigError, check_ranges, parse, run_main
from model import GPT, GPTConfig
from device import check_device, setup_runtime

CONFIG = [  # (key, default, what it sets); `python sample.py --help` prints this table
    ("out_dir", "out", "folder of the run's ckpt_<step>.pt files"),
    ("from_checkpoint_step", -1, "-1: the newest good checkpoint; N: exactly step N"),
    ("start", "\n", "the prompt; FILE:path reads it from a file"),
    ("num_samples", 3, "samples to draw"),
    ("max_new_tokens", 500, "tokens per sample"),
    ("temperature", 0.8, "1.0 samples the model's distribution; lower is more conservative"),
    ("top_k", 200, "sample among the k likeliest tokens only; 0 disables"),
    ("device", "auto", "auto (cuda when available, else cpu), cpu, cuda, cuda:N or mps"),
    ("dtype", "auto", "auto (bfloat16 on a GPU that has it, else float16; float32 on CPU), float32, bfloat16 "
                      "or float16"),
    ("seed", 1337, "seeds the sampling"),
]


def tokenizer(meta):
    """(encode, decode) for the dataset's vocabulary: its characters, or GPT-2's BPE."""
    if "chars" in meta:
        stoi = {ch: i for i, ch in enumerate(meta["chars"])}

        def encode(text):
            unknown = sorted(set(text) - set(stoi))
            if unknown:
                raise ConfigError(f"start: characters outside the model's vocabulary: {''.join(unknown)!r}")
            return [stoi[ch] for ch in text]
        return encode, lambda ids: "".join(meta["chars"][i] for i in ids)
    import tiktoken  # only BPE datasets need it, and it downloads GPT-2's vocabulary on first use
    enc = tiktoken.get_encoding(meta.get("tokenizer", "gpt2"))
    return (lambda text: enc.encode(text, allowed_special={"<|endoftext|>"})), enc.decode


def main(argv):
    cfg, _ = parse(CONFIG, argv)
    check_device(cfg["device"], cfg["dtype"])
    check_ranges(cfg, positive=("num_samples", "max_new_tokens"))
    if not 0 <= cfg["seed"] < 2 ** 63:  # what torch.manual_seed takes, and train.py's seeds
        raise ConfigError(f"seed must be in [0, 2**63), got {cfg['seed']}")
    if cfg["temperature"] <= 0.0 or cfg["top_k"] < 0:
        raise ConfigError(f"temperature must be positive and top_k not negative, got {cfg['temperature']} "
                          f"and {cfg['top_k']}")
    start = cfg["start"]
    if start.startswith("FILE:"):
        try:
            with open(start[5:], encoding="utf-8") as f:
                start = f.read()
        except OSError as e:
            raise ConfigError(f"start: cannot read {start[5:]}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"start: {start[5:]} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    step, state = checkpoint.find_to_read(cfg["out_dir"], cfg["from_checkpoint_step"], "sample from")
    encode, decode = tokenizer(state["meta"])
    ids = encode(start)
    if not ids:
        raise ConfigError("start: the prompt is empty; give at least one token")

    device, _, autocast = setup_runtime(cfg["device"], cfg["dtype"])
    torch.manual_seed(cfg["seed"])
    model = GPT(GPTConfig(**state["model_args"]))
    model.load_state_dict(state["model"])
    model.eval().to(device)
    print(f"sampling from {checkpoint.path_for(cfg['out_dir'], step)}", file=sys.stderr)
    x = torch.tensor(ids, dtype=torch.long, device=device)[None, ...]  # (1, t)
    with autocast:
        for _ in range(cfg["num_samples"]):
            y = model.generate(x, cfg["max_new_tokens"], temperature=cfg["temperature"], top_k=cfg["top_k"] or None,
                               vocab_size=state["meta"]["vocab_size"])
            print(decode(y[0].tolist()))
            print("---------------")


if __name__ == "__main__":
    run_main(main, (checkpoint.CheckpointError,))
