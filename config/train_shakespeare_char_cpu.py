# The baby GPT cut down for a laptop CPU: a few minutes on 2 cores, val loss about 2.0.
# First: python data/shakespeare_char/prepare.py
out_dir = "out-shakespeare-char-cpu"
dataset = "shakespeare_char"
device = "cpu"
compile = False
eval_interval = 250
eval_iters = 20
log_interval = 10
checkpoint_interval = 250

batch_size = 12
block_size = 64

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0

learning_rate = 1e-3
max_iters = 2000
lr_decay_iters = 2000
min_lr = 1e-4
warmup_iters = 100
