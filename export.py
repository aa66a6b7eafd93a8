"""
Export the checkpoint of any step as a Hugging Face GPT-2 folder, which transformers loads as it is
(GPT2LMHeadModel.from_pretrained(export_dir)); the conversion itself is hf_gpt2.py's:

    python export.py --out_dir=out --from_checkpoint_step=-1 --export_dir=hf-out

The folder holds config.json, model.safetensors and the run's vocabulary, so that it decodes alone: GPT-2's
tokenizer (vocab.json, merges.txt) for a run on GPT-2's BPE (meta.json's "tokenizer" is "gpt2"), the characters as a
tokenizer.json (hf_gpt2.char_tokenizer) for a character-level run, and a tokenizer_config.json for AutoTokenizer.
The model computes what ours does: config.json says activation_function "gelu", the exact GELU of our MLP, and a
model trained with bias=False gets zero biases, as GPT-2 always has them. A vocabulary padded for speed (50304 for
GPT-2's 50257 tokens) is exported as it is: the model scores 50304 ids, of which the tokenizer makes and reads the
first 50257. An out_dir without checkpoints is an error that names a folder beside it, with a similar name, that
has some; one with nanoGPT's ckpt.pt alone exports it, its characters from its dataset's meta.pkl
(dataset.checkpoint_vocab; --dataset says where it is).
"""
import json
import os
import shutil
import sys

import checkpoint
from configurator import ConfigError, parse
from dataset import checkpoint_vocab
from hf_gpt2 import char_tokenizer, save_safetensors, to_hf_gpt2
from stops import run_main

CONFIG = [  # (key, default, what it sets); `python export.py --help` prints this table
    ("out_dir", "out", "folder of the run's ckpt_<step>.pt files"),
    ("from_checkpoint_step", -1, "-1: the newest good checkpoint; N: exactly step N"),
    ("export_dir", "hf-out", "the folder to write; it must not exist, or be empty"),
    ("dataset", "", "nanoGPT's character-level ckpt.pt only: the dataset (a name under data/, or a folder) whose "
                    "meta.pkl holds its characters; '': the one its config names"),
]
# GPT-2's tokenizer files, as tiktoken downloads and caches them (with their sha256), under transformers' names
GPT2_BPE = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
TOKENIZER_FILES = [
    ("vocab.json", "encoder.json", "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    ("merges.txt", "vocab.bpe", "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
]
EOT = 50256  # GPT-2's <|endoftext|>: its only special token, and so its bos, eos and unk


def main(argv):
    cfg, _ = parse(CONFIG, argv)
    dest = os.path.normpath(cfg["export_dir"])  # no trailing slash: dest.tmp<pid> is then its sibling
    if os.path.exists(dest) and not (os.path.isdir(dest) and not os.listdir(dest)):
        raise ConfigError(f"export_dir {dest} exists and is not an empty folder: remove it, or pass another")
    step, out_dir = cfg["from_checkpoint_step"], cfg["out_dir"]
    path = os.path.join(out_dir, checkpoint.NANOGPT_NAME)
    if step == -1 and not checkpoint.list_steps(out_dir) and os.path.isfile(path):  # a nanoGPT out_dir
        state = checkpoint.load(path)
        step = state["step"]
    else:
        step, state = checkpoint.find_to_read(out_dir, step, "export")
        path = checkpoint.path_for(out_dir, step)
    meta = checkpoint_vocab(state, path, cfg["dataset"])
    checkpoint.model_of(state, path)  # weights this code's model.py cannot take are one line
    try:
        tensors, config = to_hf_gpt2(state["model"], state["model_args"])
    except KeyError as e:  # a model whose weights are not GPT-2's (a fork's rotary embeddings, say)
        raise checkpoint.CheckpointError(f"{path}: its model is not GPT-2's, which a Hugging Face GPT-2 folder "
                                         f"holds: it has no {e.args[0]}") from None
    gpt2_bpe = meta.get("tokenizer") == "gpt2"
    # transformers checks these against the vocabulary: GPT-2's <|endoftext|>, or none for another vocabulary
    config.update(bos_token_id=EOT if gpt2_bpe else None, eos_token_id=EOT if gpt2_bpe else None)
    files = {"config.json": json.dumps(config, indent=2).encode()}
    if gpt2_bpe:
        import tiktoken.load
        for name, cached, sha256 in TOKENIZER_FILES:
            try:
                files[name] = tiktoken.load.read_file_cached(GPT2_BPE + cached, sha256)
            except Exception as e:  # offline without tiktoken's cache: requests' errors, or a hash mismatch
                raise ConfigError(f"cannot get GPT-2's {cached} through tiktoken ({type(e).__name__}): run once "
                                  f"with network, or set TIKTOKEN_CACHE_DIR to a cache that has it (docs/data.md)") \
                    from None
        tokenizer_config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>",
                            "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    elif "chars" in meta:
        files["tokenizer.json"] = json.dumps(char_tokenizer(meta["chars"]), indent=1).encode()
        # clean_up_tokenization_spaces off: it would take the space out of " ," and alter the text decoded
        tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    else:  # a dataset's meta.json may give vocab_size alone
        tokenizer_config = None
        print(f"warning: {path} holds no vocabulary (its dataset's meta.json gave no characters and no tokenizer's "
              f"name): the export has the weights alone", file=sys.stderr)
    if tokenizer_config:
        tokenizer_config["model_max_length"] = config["n_positions"]
        files["tokenizer_config.json"] = json.dumps(tokenizer_config, indent=2).encode()

    # written in a temporary folder beside dest and renamed into place: export_dir is all there or not there
    tmp = f"{dest}.tmp{os.getpid()}"
    try:
        os.makedirs(tmp)
        save_safetensors(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        for name, data in files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        checkpoint.fsync_dir(tmp)
        os.replace(tmp, dest)  # replaces an empty folder; fails, changing nothing, if one appeared and filled up
        checkpoint.fsync_dir(os.path.dirname(os.path.abspath(dest)))
    except OSError as e:
        raise ConfigError(f"cannot write {e.filename2 or e.filename or dest}: {e.strerror}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"exported step {step} ({path}) to {dest}: {', '.join(['model.safetensors', *files])}")


if __name__ == "__main__":
    run_main(main, (checkpoint.CheckpointError,))
