#!/usr/bin/env bash
# Every GPU figure that benchmarks/README.md lists, most wanted first, within one time budget:
#
#     benchmarks/gpu.sh OUTDIR [SECONDS]        (SECONDS: the whole run's budget, default 540)
#
# Each benchmark writes OUTDIR/<name>.json and is stopped when the budget runs out; all output goes to
# OUTDIR/gpu.log too. PYTHON picks the interpreter (default python3).
set -u
out=${1:?usage: benchmarks/gpu.sh OUTDIR [SECONDS]}
deadline=$(( $(date +%s) + ${2:-540} ))
py=${PYTHON:-python3}
mkdir -p "$out"
log="$out/gpu.log"

# run NAME CAP ARGS...: the benchmark ARGS with --json OUTDIR/NAME.json, for at most CAP seconds (and the budget)
run() {
    local name=$1 cap=$2 left began
    shift 2
    left=$(( deadline - $(date +%s) - 5 ))
    (( left < cap )) && cap=$left
    if (( cap < 10 )); then echo "== $name: skipped, out of time" | tee -a "$log"; return; fi
    echo "== $name ($cap s at most): $*" | tee -a "$log"
    began=$(date +%s)
    PYTHONUNBUFFERED=1 timeout "$cap" "$py" "$@" --json "$out/$name.json" 2>&1 | tee -a "$log"
    echo "== $name: exit ${PIPESTATUS[0]} after $(( $(date +%s) - began )) s" | tee -a "$log"
}

# rate STAGE: the base model's samples/s of STAGE from step-eager.json
rate() {
    "$py" -c "import json, sys; rows = json.load(open('$out/step-eager.json'))['rows']; \
print(next(r['samples_per_s'] for r in rows if r['stage'] == '$1' and r['size'] == 'hicmae_base'))" 2>/dev/null || echo 1500
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
  "$py" -c "import sys, torch, cv2; print(sys.version.split()[0], torch.__version__, cv2.__version__)"; } 2>&1 | tee -a "$log"
run step-eager 150 benchmarks/train_step.py
run loader-pretrain 80 benchmarks/loader.py --workers 8 16 --clips 2048 --batch 40 --examples pretrain \
    --decode window --step-rate "$(rate pretrain)"
run loader-finetune 60 benchmarks/loader.py --workers 8 16 --clips 1024 --batch 14 --examples finetune \
    --decode window --step-rate "$(rate finetune)"
run numerics 70 benchmarks/train_step.py --sizes hicmae_base --check-numerics
run jpeg 40 benchmarks/jpeg_decode.py
run step-best 110 benchmarks/train_step.py --sizes hicmae_base --stages pretrain --best-batch --warmup 3 --steps 10
run step-compile 240 benchmarks/train_step.py --sizes hicmae_base --compile --warmup 5 --steps 20
# the paper's global batches on one GPU: 4 micro-batches of the reference's per-GPU batch (scaling.accum_steps)
run step-accum 120 benchmarks/train_step.py --sizes hicmae_base --accum-steps 4 --warmup 3 --steps 10
run step-accum-graphs 240 benchmarks/train_step.py --sizes hicmae_base --accum-steps 4 --compile reduce-overhead \
    --warmup 5 --steps 10
