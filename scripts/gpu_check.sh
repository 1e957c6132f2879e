#!/usr/bin/env bash
# GPU check for the expert kernels (issue 17) and the paper preset, in ~8 minutes on one H200:
#   1. the CUDA tests (tests whose names contain "cuda": tests/test_expert_kernels.py and the rest);
#   2. `harness bench` in bfloat16, one row per experts_impl (loop, loop_recompute, fused, padded_bmm, grouped_mm, auto; fused runs loop_recompute on CUDA);
#   3. a ~2-minute slice of the `paper` LM preset, smoe and dense (enwik8 if found, else shakespeare);
#   3b. the model-level training step of the paper model (benchmarks/model_step.py), loop vs grouped_mm vs auto;
#   4. the same slice on 2 GPUs (`--nproc 2`, experts sharded), only where two devices exist.
# Prints the figures; exits non-zero on the first failure. Every step runs under `timeout`.
#
#   scripts/gpu_check.sh             # run it (needs CUDA)
#   scripts/gpu_check.sh --dry-run   # print the commands only (any machine)
#
# Environment: ENWIK8=/path/to/enwik8 (the 100M-byte file), OUT=dir for the store and logs
# (default a temp dir), IMPL=the paper slice's model.experts_impl (default auto),
# PAPER_STEPS (default 400), NPROC_STEPS (default 200).
set -euo pipefail

DRY=0
for a in "$@"; do
  case "$a" in
    --dry-run|-n) DRY=1 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $a (use --dry-run)" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-$(mktemp -d -t gpu_check.XXXXXX)}
mkdir -p "$OUT"
STORE="$OUT/gpu_check.duckdb"
IMPL=${IMPL:-auto}
PAPER_STEPS=${PAPER_STEPS:-400}
NPROC_STEPS=${NPROC_STEPS:-200}
START=$SECONDS

step() {  # step NAME SECONDS CMD...: run under timeout, tee the log, fail loudly
  local name=$1 limit=$2; shift 2
  echo
  echo "=== [$name] (timeout ${limit}s) $*"
  if [[ $DRY == 1 ]]; then return 0; fi
  local t0=$SECONDS rc=0
  timeout --signal=TERM --kill-after=15 "$limit" "$@" 2>&1 | tee "$OUT/$name.log" || rc=${PIPESTATUS[0]}
  if [[ $rc != 0 ]]; then
    [[ $rc == 124 ]] && echo "gpu_check: [$name] ran past ${limit}s" >&2
    echo "gpu_check: [$name] FAILED (exit $rc); log: $OUT/$name.log" >&2
    exit "$rc"
  fi
  echo "=== [$name] ok in $((SECONDS - t0))s"
}

if [[ $DRY == 0 ]]; then
  NGPU=$($PY -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')
  if [[ $NGPU -lt 1 ]]; then
    echo "gpu_check: no CUDA device (torch.cuda.is_available() is False); nothing to check" >&2
    exit 1
  fi
  $PY -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"torch {torch.__version__}, {torch.cuda.device_count()} x {p.name} (sm{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)")'
else
  NGPU=${NGPU:-2}  # dry run: show every step
fi

# the corpus of the paper slice: enwik8 where the file is, else shakespeare (bundled)
DATA=(--set data.corpus=shakespeare)
for f in "${ENWIK8:-}" data/enwik8 "$HOME/data/enwik8" /data/enwik8; do
  if [[ -n "$f" && -f "$f" ]]; then DATA=(--set "data.path=$f"); break; fi
done
echo "gpu_check: out=$OUT store=$STORE paper corpus: ${DATA[*]}"

# 1. CUDA tests
step cuda_tests 90 "$PY" -m pytest -q -x -k cuda tests/

# 2. the layer in bf16, one row per expert kernel (vs_dense: issue 17's <= 1.05 target)
step bench_bf16 120 "$PY" -m harness.cli bench --routers smoe,dense --experts-impl loop,loop_recompute,fused,padded_bmm,grouped_mm,auto \
  --dtype bfloat16 --device cuda --d-model 264,1024 --d-ff 1024 --experts 16 --tokens 8192,32768 --repeats 7 \
  --warmup 2 --no-naive --store "$STORE"

# 3. ~2 minutes of the paper preset (CompeteSMoE enwik8 "small": 6 x d264, 16 experts, ctx 512, batch 48)
PAPER=(--suite lm --preset paper --routers smoe,dense --no-eval --quiet --jobs 1 --store "$STORE" --runs-dir "$OUT/runs"
       "${DATA[@]}" --set "model.experts_impl=$IMPL" --set "train.steps=$PAPER_STEPS"
       --set train.eval_every=200 --set train.eval_batches=4 --set train.ckpt_every=100000 --set train.warmup_steps=100)
step paper_slice 240 "$PY" -m harness.cli run "${PAPER[@]}"

# 3b. the whole training step of the paper model, per router and kernel (issue 17's model-level targets)
step model_step 150 "$PY" benchmarks/model_step.py --preset paper --routers smoe,xmoe,moge \
  --experts-impl loop,grouped_mm,auto --repeats 5 --warmup 1 --steps-per-round 2 --device cuda "${DATA[@]}"

# 4. two GPUs: data + expert parallelism
if [[ $NGPU -ge 2 ]]; then
  EP=("${PAPER[@]}" --set "train.steps=$NPROC_STEPS" --set model.expert_parallel=true --runs-dir "$OUT/runs_ep")
  step nproc2 150 "$PY" -m harness.cli run "${EP[@]}" --nproc 2
else
  echo; echo "=== [nproc2] skipped: $NGPU CUDA device(s)"
fi

step figures 60 "$PY" -m harness.cli runs --store "$STORE"
echo
echo "gpu_check: all steps passed in $((SECONDS - START))s (logs and store in $OUT)"
