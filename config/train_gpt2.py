# GPT-2 (124M) on OpenWebText, on one node of 8 GPUs:
#   python data/openwebtext/prepare.py
#   torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py
# About 5 days on 8 A100 40GB to val loss about 2.85.
out_dir = "out-gpt2"
dataset = "openwebtext"
eval_interval = 1000
eval_iters = 200
log_interval = 10
checkpoint_interval = 1000
keep_last_checkpoints = 3  # about 1.5 GB each
keep_every = 50000  # milestones to rewind to, kept for good

# 12 sequences x 1024 tokens x 40 micro-steps = 491,520 tokens per step, whatever the number of GPUs
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8

n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
bias = False
vocab_size = 50304  # GPT-2's 50257 padded to a multiple of 64, which runs faster

learning_rate = 6e-4
max_iters = 600000  # about 300B tokens
lr_decay_iters = 600000
min_lr = 6e-5
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
warmup_iters = 2000
