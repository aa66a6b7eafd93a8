#!/usr/bin/env bash
# The checks a CPU cannot make, on one CUDA GPU, with no network; every Python call is ${PYTHON:-python3}.
#   bash gpu_check.sh                       # GPT-2 124M, bf16 (dtype auto), torch.compile (on by default on CUDA)
#   DEVICE=cpu SMALL=1 bash gpu_check.sh    # the same checks with a small model on a CPU: tests this script
# It prints one table, each check ok or MISSED with what it measured, and exits 1 when any check missed (every
# check runs regardless). KEEP=1 keeps the runs' folders and logs.
#
# The checks:
#   - `python train.py` with no config flags (device auto) trains on the GPU; so does torchrun with 1 process
#   - sample.py --device=auto prints text from that run's checkpoint
#   - GPT-2 124M's shape with --deterministic=True: unbroken runs A and B, and C resumed from A's halfway
#     checkpoint, are equal in every model and optimizer tensor (torch.equal)
#   - the same without --deterministic: C is no further from A than B is (max |difference| over all tensors)
#   - --dtype=float16 (GradScaler) --deterministic=True: a resumed run equals an unbroken one, scaler included
#   - --fsdp=True under torchrun (FSDP2, one process): it trains on the GPU, writes checkpoint folders, and a run
#     resumed from its halfway folder equals it; so does the folder resumed by one plain process (unsharded)
#   - bench.py's table for the GPT-2 size, where tokens/s of train.py's loop against a plain loop, and with
#     --deterministic=True against without, are each measured in the same run
#
# Time: at most 6 minutes on one H100/H200 from a cold torch.compile cache, about 4 by this estimate. A GPT-2
# run takes ~5 s to start, ~40 s to compile training and ~15 s evaluation (~10 s and ~5 s once inductor's
# on-disk cache has the graphs), then 35-40 ms a step, 20 steps. 1. ~2.5 min: the deterministic A, B, C and the
# non-deterministic A, B, C as two chains side by side (2 GPT-2 processes at a time, ~20 GB each); A compiles
# cold (~85 s with the other chains running), B and C find A's graphs in the cache (~25 s each); the small
# runs (auto, sample, float16, torchrun) run alongside. 2. ~10 s: loading and comparing the checkpoints.
# 3. ~1.5 min: bench.py, alone, since it times things; its GPT-2 graphs are the runs' (same shape, batch, dtype)
# and so come from the cache. The heading line gives the seconds each part took, and the line under the table
# each run's. On a CPU (under a minute on 2 cores) the script is what is checked: bench.py runs alongside the
# rest, and the deterministic A, B, C, in float16, stand in for the non-deterministic and float16 runs.
set -uo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}

compare() {  # one table row per spec; the judge of every checkpoint check
  #   equal NAME REF OTHER         every tensor and number of model, optimizer and scaler state is equal
  #   equal_scaler NAME REF OTHER  the same, and the state has a GradScaler's (a float16 run's)
  #   closer NAME A C B            max |A - C| <= max |A - B| over all tensors
  "$PY" - "$@" <<'PY'
import sys
import torch
import checkpoint

loaded = {}


def leaves(path):
    """{key path: tensor or number} of a checkpoint's model, optimizer and scaler state."""
    if path not in loaded:
        state, out = checkpoint.load(path), {}

        def walk(key, obj):
            items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else None
            if items is None:
                out[key] = obj
            for k, v in items or ():
                walk(f"{key}.{k}", v)
        for part in ("model", "optimizer", "scaler"):
            walk(part, state.get(part) or {})
        loaded[path] = out
    return loaded[path]


def same(x, y):
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)
    return x == y


def distance(a, b):
    assert a.keys() == b.keys(), f"different keys: {sorted(a.keys() ^ b.keys())[:3]}"
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a
               if isinstance(a[k], torch.Tensor) and a[k].numel())


args, failed = sys.argv[1:], False
while args:
    mode, name, paths, args = args[0], args[1], args[2:4 + (args[0] == "closer")], args[4 + (args[0] == "closer"):]
    try:
        got = [leaves(p) for p in paths]
        if mode == "closer":
            resumed, unbroken = distance(got[0], got[1]), distance(got[0], got[2])
            ok = resumed <= unbroken
            figure = f"max |A-C| {resumed:.3g} {'<=' if ok else '>'} max |A-B| {unbroken:.3g}"
        else:
            a, b = got
            differ = sorted(k for k in a.keys() | b.keys() if k not in a or k not in b or not same(a[k], b[k]))
            count = {p: sum(isinstance(v, torch.Tensor) for k, v in a.items() if k.startswith(p + "."))
                     for p in ("model", "optimizer")}
            scaler = {k[7:]: v for k, v in a.items() if k.startswith("scaler.")}
            ok = not differ and count["optimizer"] > count["model"] > 0 and (mode == "equal" or "scale" in scaler)
            figure = (f"{len(differ)} of {len(a)} differ: {', '.join(differ[:3])}" if differ else
                      f"all equal: {count['model']} model and {count['optimizer']} optimizer tensors"
                      + (f", scaler (scale {scaler['scale']:g})" if scaler else ", no GradScaler state"))
    except Exception as e:
        ok, figure = False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    failed |= not ok
    print(f"{name}\t{'ok' if ok else 'MISSED'}\t{figure}")
sys.exit(failed)
PY
}

table() {  # the rows on stdin (check, ok or MISSED, figure) as a table; fails when a check missed
  local rows; rows=$(cat)
  awk -F'\t' '{ printf "%-46s %-7s %s\n", $1, $2, $3 }' <<<"$rows"
  ! grep -q $'\tMISSED\t' <<<"$rows"
}

if [ "${1:-}" = compare ]; then  # bash gpu_check.sh compare SPEC...: those comparisons alone, as a table
  shift
  compare "$@" | table
  exit
fi

START=$SECONDS
OUT=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-XXXXXX")
[ -n "${KEEP:-}" ] || trap 'rm -rf "$OUT"' EXIT
if [ -n "${SMALL:-}" ]; then
  STEPS=4; SHAPE=(--n_layer=2 --n_head=2 --n_embd=64 --block_size=32 --batch_size=8)
  AUTO=(--max_iters=2 --eval_iters=1); BENCH=(--sizes=small --steps=1 --repeats=1)
else
  STEPS=20; SHAPE=(--n_layer=12 --n_head=12 --n_embd=768 --block_size=1024 --vocab_size=50304 --batch_size=16)
  AUTO=(--max_iters=20); BENCH=(--sizes=gpt2 --repeats=1)
fi
[ "$DEVICE" = cpu ] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # the same in every run: CPU sums depend on it
HALF=$((STEPS / 2))
RUN=(--device="$DEVICE" --max_iters=$STEPS --lr_decay_iters=$STEPS --warmup_iters=2 --eval_iters=1
     --eval_interval=$STEPS --log_interval=$HALF --checkpoint_interval=$HALF --keep_last_checkpoints=0)
ckpt() { printf '%s/ckpt_%07d.pt' "$OUT/$1" "$2"; }
folder() { printf '%s/ckpt_%07d' "$OUT/$1" "$2"; }

run() {  # run NAME CMD...: CMD's output into $OUT/NAME.log, its exit status into $OUT/NAME.rc, seconds into NAME.s
  local name=$1 t0=$SECONDS; shift
  "$@" >"$OUT/$name.log" 2>&1
  echo $? >"$OUT/$name.rc"
  echo $((SECONDS - t0)) >"$OUT/$name.s"
}
train() { local name=$1; shift; run "$name" "$PY" train.py "${SHAPE[@]}" "${RUN[@]}" --out_dir="$OUT/$name" "$@"; }
resume() {  # resume FROM NAME FLAGS...: FROM's halfway checkpoint, trained on in a folder of its own
  local from=$1 name=$2; shift 2
  mkdir -p "$OUT/$name" && cp "$(ckpt "$from" $HALF)" "$OUT/$name/" 2>/dev/null  # else this run says it has none
  train "$name" --from_checkpoint_step=$HALF "$@"
}
three() { local p=$1; shift; train "${p}_a" "$@"; train "${p}_b" "$@"; resume "${p}_a" "${p}_c" "$@"; }

bench() { run bench "$PY" bench.py --device="$DEVICE" "${BENCH[@]}"; }
sharded() {  # a sharded run (small shape, deterministic, not compiled), and two resumes of its halfway folder
  local how=("${RUN[@]}" --n_layer=2 --n_head=2 --n_embd=64 --block_size=64 --batch_size=8 --deterministic=True
             --compile=False --fsdp=True)
  run fsdp "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 train.py "${how[@]}" --out_dir="$OUT/fsdp"
  mkdir -p "$OUT/fsdp_resumed" "$OUT/fsdp_unsharded"
  cp -r "$(folder fsdp $HALF)" "$OUT/fsdp_resumed/"; cp -r "$(folder fsdp $HALF)" "$OUT/fsdp_unsharded/"
  run fsdp_resumed "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 train.py "${how[@]}" \
    --out_dir="$OUT/fsdp_resumed" &
  run fsdp_unsharded "$PY" train.py "${how[@]}" --out_dir="$OUT/fsdp_unsharded"
  wait
}
torchrun_auto() {
  run torchrun "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 train.py "${AUTO[@]}" \
    --out_dir="$OUT/torchrun"
}

# 1. everything but the timings, side by side (and on a CPU, where this checks the script, bench.py too)
if [ "$DEVICE" = cpu ]; then  # the script is what is checked here: one chain of runs stands in for three
  NONDET=det FP16=(det_a det_c)  # a CPU computes the same without deterministic, and the det runs train in float16
  bench &
  three det --deterministic=True --dtype=float16 &
  { torchrun_auto; sharded; } &
else
  NONDET=nondet FP16=(fp16 fp16_resumed)
  three det --deterministic=True &
  three nondet &
  { SHAPE=(--n_layer=2 --n_head=2 --n_embd=64 --block_size=64 --batch_size=8)
    train fp16 --dtype=float16 --deterministic=True; resume fp16 fp16_resumed --dtype=float16 --deterministic=True
    torchrun_auto; sharded; } &
fi
{ run auto "$PY" train.py "${AUTO[@]}" --out_dir="$OUT/auto"
  run sample "$PY" sample.py --out_dir="$OUT/auto" --device=auto --num_samples=1 --max_new_tokens=100; } &
wait
RUNS_S=$((SECONDS - START))

# 2. the checkpoints
compare equal "deterministic: unbroken B == unbroken A" "$(ckpt det_a $STEPS)" "$(ckpt det_b $STEPS)" \
        equal "deterministic: resumed C == unbroken A" "$(ckpt det_a $STEPS)" "$(ckpt det_c $STEPS)" \
        closer "not deterministic: |A-C| <= |A-B|" \
          "$(ckpt ${NONDET}_a $STEPS)" "$(ckpt ${NONDET}_c $STEPS)" "$(ckpt ${NONDET}_b $STEPS)" \
        equal_scaler "float16 + GradScaler: resumed == unbroken" \
          "$(ckpt "${FP16[0]}" $STEPS)" "$(ckpt "${FP16[1]}" $STEPS)" \
        equal "sharded: resumed folder == unbroken" "$(folder fsdp $STEPS)" "$(folder fsdp_resumed $STEPS)" \
        equal "sharded: resumed unsharded == sharded" "$(folder fsdp $STEPS)" "$(ckpt fsdp_unsharded $STEPS)" \
        >"$OUT/compared.rows"
[ -n "${KEEP:-}" ] || rm -rf "$OUT"/det_? "$OUT"/nondet_?  # 15 GB at GPT-2's size; bench.py needs the disk
COMPARE_S=$((SECONDS - START - RUNS_S))

# 3. bench.py, alone: it times things
[ "$DEVICE" = cpu ] || bench

row() { printf '%s\t%s\t%s\n' "$1" "$2" "$3"; }
status() { [ "$(cat "$OUT/$1.rc" 2>/dev/null)" = 0 ] && echo ok || echo MISSED; }
trained() {  # trained NAME CHECK: ok when NAME exited 0 and trained on DEVICE's kind of device
  local how last
  how=$(grep -oE '\(device [^,]+, dtype [a-z0-9]+\)' "$OUT/$1.log" | tail -1 | tr -d '()' |
        sed 's/device //; s/, dtype//')
  last=$(grep -E '^step [0-9]+: loss' "$OUT/$1.log" | tail -1 |
         sed -E 's/: loss [^,]*, lr [^,]*,/,/; s/^step ([0-9]+),/\1 steps,/')
  if [ "$(status "$1")" = MISSED ]; then
    row "$2" MISSED "exit $(cat "$OUT/$1.rc"): $(grep -v '^ ' "$OUT/$1.log" | tail -1)"
  elif [ "${how%%[: ]*}" != "${DEVICE%%:*}" ]; then
    row "$2" MISSED "trained on ${how:-an unnamed device}, not on ${DEVICE%%:*}"
  elif [ -z "$last" ]; then row "$2" MISSED "logged no step"
  else row "$2" ok "$how: $last"; fi
}
ratio() {  # ratio CHECK WHAT: the ratio bench.py measured in its row WHAT, with the two figures
  local line ours
  line=$(grep -E "^[a-z0-9]+ +\| $2 " "$OUT/bench.log" | head -1)
  ours=$(cut -d'|' -f3 <<<"$line" | sed 's/^ *//; s/ *$//')
  if [[ $ours =~ ^(.*)\ \(([0-9.]+x)\ (.*)\)$ ]]; then
    row "$1" ok "${BASH_REMATCH[2]}: ${BASH_REMATCH[1]} against $(cut -d'|' -f4 <<<"$line" | sed 's/^ *//; s/ *$//')"
  else
    row "$1" MISSED "no row '$2' from bench.py"
  fi
}
{
  trained auto "train.py, no config flags (device auto)"
  trained torchrun "torchrun --nproc_per_node=1 (device auto)"
  trained fsdp "torchrun --fsdp=True, 1 process (FSDP2)"
  text=$(grep -vE '^(sampling from|-+$)' "$OUT/sample.log" | wc -c)
  if [ "$(status sample)" = ok ] && [ "$text" -gt 50 ]; then row "sample.py --device=auto" ok "$text characters of text"
  else row "sample.py --device=auto" MISSED "exit $(cat "$OUT/sample.rc"): $(tail -1 "$OUT/sample.log")"; fi
  cat "$OUT/compared.rows"
  n=$(grep -cE '^[a-z0-9]+ +\| ' "$OUT/bench.log")
  rows=$( [ "$n" -gt 0 ] && echo "$((n - 1)) rows, below" || echo "no table")
  row "bench.py's table" "$( [ "$(status bench)" = ok ] && [ "$n" -ge 9 ] && echo ok || echo MISSED)" \
      "${BENCH[0]#--}: $rows; exit $(cat "$OUT/bench.rc")"
  ratio "bench: our loop / plain loop, tokens/s" "training tokens/s"
  ratio "bench: deterministic / not, tokens/s" "deterministic tokens/s"
} >"$OUT/table.rows"

header=$(grep -m1 '^bench.py on ' "$OUT/bench.log" | sed 's/^bench.py on //')
[ -n "$header" ] || header=$("$PY" -c "import torch; print(torch.cuda.get_device_name() \
  if torch.cuda.is_available() else 'CPU', 'torch', torch.__version__)")
echo "gpu_check.sh, $(date -u '+%Y-%m-%d %H:%M UTC'), $header; ${STEPS} steps a run; $((SECONDS - START)) s" \
     "(runs ${RUNS_S} s, comparisons ${COMPARE_S} s, bench.py $(cat "$OUT/bench.s") s$(
       [ "$DEVICE" = cpu ] && echo " among the runs"))"
table <"$OUT/table.rows"
passed=$?
echo "seconds per run: $(for s in "$OUT"/*.s; do printf '%s %s, ' "$(basename "$s" .s)" "$(cat "$s")"; done |
                         sed 's/, $//')"
[ -z "${KEEP:-}" ] || echo "logs and runs: $OUT"
grep -qE '^size +\| ' "$OUT/bench.log" && { echo; grep -E '^([a-z0-9]+|size) +\| ' "$OUT/bench.log"; }
for rc in "$OUT"/*.rc; do  # what went wrong, where something did
  [ "$(cat "$rc")" = 0 ] || { echo; echo "$(basename "$rc" .rc) exited $(cat "$rc"):"; tail -5 "${rc%.rc}.log"; }
done
exit $passed
