#!/usr/bin/env bash
# GPU check, under 5 minutes on one H200: GPT-2 124M with bf16 and torch.compile.
#   bash bench_gpu.sh                 # on a CUDA machine
#   DEVICE=cpu SMALL=1 bash bench_gpu.sh   # the same steps with a small model on a CPU, to check the script
# 1. bench.py's table for the 124M model: tokens/s and MFU of our loop and of a plain loop, sync vs async
#    stall, save and load bandwidth, resume time, size.
# 2. Resume fidelity: two unbroken runs (A, B) and a run resumed halfway from A's checkpoint (C). GPU kernels
#    are not bitwise deterministic, so the promise is |A - C| no larger than |A - B|.
set -euo pipefail
cd "$(dirname "$0")"
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-100}
if [ -n "${SMALL:-}" ]; then
  SIZES=small; MODEL="--n_layer=4 --n_head=4 --n_embd=128 --block_size=64 --batch_size=16 --vocab_size=128"
else
  SIZES=gpt2; MODEL="--n_layer=12 --n_head=12 --n_embd=768 --block_size=1024 --batch_size=16 --vocab_size=50304"
fi
OUT=$(mktemp -d "${TMPDIR:-/tmp}/bench-gpu-XXXX")
trap 'rm -rf "$OUT"' EXIT

python bench.py --device="$DEVICE" --sizes="$SIZES"

HALF=$((STEPS / 2))
COMMON="$MODEL --device=$DEVICE --dataset=python_char --max_iters=$STEPS --lr_decay_iters=$STEPS --warmup_iters=10
        --eval_interval=$STEPS --eval_iters=5 --log_interval=25 --checkpoint_interval=$HALF --keep_last_checkpoints=0"
python train.py $COMMON --out_dir="$OUT/a" --from_checkpoint_step=0
python train.py $COMMON --out_dir="$OUT/b" --from_checkpoint_step=0
mkdir -p "$OUT/c" && cp "$OUT/a/ckpt_$(printf %07d $HALF).pt" "$OUT/c/"
python train.py $COMMON --out_dir="$OUT/c" --from_checkpoint_step=$HALF

python - "$OUT" "$STEPS" <<'PY'
import sys, torch, checkpoint
out, steps = sys.argv[1], int(sys.argv[2])
a, b, c = (checkpoint.load(checkpoint.path_for(f"{out}/{r}", steps))["model"] for r in "abc")
diff = lambda x, y: max((x[k].float() - y[k].float()).abs().max().item() for k in x)
unbroken, resumed = diff(a, b), diff(a, c)
print(f"max |weight difference| after {steps} steps: two unbroken runs {unbroken:.3e}, unbroken vs resumed {resumed:.3e}")
ok = resumed <= max(unbroken, 1e-12) * 1.5 if unbroken else resumed == 0
print("resume fidelity:", "ok (as close as two unbroken runs)" if ok else "MISSED (resumed differs more than two unbroken runs)")
PY
