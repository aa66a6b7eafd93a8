# Finetune GPT-2 XL (1.5B) on tinyshakespeare in GPT-2's BPE, as nanoGPT does; one GPU with 40+ GB, minutes:
#   python data/shakespeare/prepare.py && python train.py config/finetune_shakespeare.py
#   python sample.py --out_dir=out-shakespeare --start="ROMEO:"
# init_from downloads the weights from the Hugging Face hub (pip install huggingface_hub), or names a local folder.
out_dir = "out-shakespeare"
init_from = "gpt2-xl"  # the largest GPT-2; gpt2, gpt2-medium and gpt2-large need less memory
dataset = "shakespeare"
eval_interval = 5
eval_iters = 40
checkpoint_interval = 5
keep_last_checkpoints = 1  # keep_best keeps the best too: two files at most, about 19 GB each (with AdamW)

# 1 sequence x 1024 tokens x 32 micro-steps = 32,768 tokens per step; the ~300K training tokens are ~9 steps
batch_size = 1
block_size = 1024  # GPT-2's whole context
gradient_accumulation_steps = 32
max_iters = 20  # about two epochs: more overfits

learning_rate = 3e-5  # small and constant, so finetuning does not wreck what pretraining learned
decay_lr = False
