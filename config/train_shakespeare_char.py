# The baby GPT on tinyshakespeare, character level: about 3 minutes on one A100, val loss about 1.47.
# First: python data/shakespeare_char/prepare.py
out_dir = "out-shakespeare-char"
dataset = "shakespeare_char"
eval_interval = 250  # it overfits: watch the val loss
eval_iters = 200
log_interval = 10
checkpoint_interval = 250

gradient_accumulation_steps = 1
batch_size = 64
block_size = 256  # characters of context

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

learning_rate = 1e-3  # a small model can take a high rate
max_iters = 5000
lr_decay_iters = 5000
min_lr = 1e-4
beta2 = 0.99  # few tokens per step, so a shorter memory
warmup_iters = 100
