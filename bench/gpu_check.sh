#!/bin/bash
# One GPU check of a bare CUDA machine (H100/H200) in one call, within 7 minutes, everything
# under $OUT:
#   0. install     the wheels of ./.whl (bench/build_wheels.sh) into $GPU_CHECK_SITE
#   1. preflight   nvidia-smi and the imports the later steps need (names what is missing)
#   2. gpu-tests   the tests that exercise CUDA (pytest): compiled sampling with CUDA graphs, the
#                  bf16 train step under torch.cuda.set_sync_debug_mode("error")
#   3. train-b64   bench_train.py, the authors' preset at 256 px (16x16x64 latents), bf16, one GPU,
#                  DeepSpeed ZeRO-2 against the plain torch loop: samples/s and MFU
#   4. sampling    bench_sampling.py in its GPU mode
#   5. train-fill  bench_train.py again at a batch that fills much more of the memory
# Every step runs under its own timeout, cut to what is left of GPU_CHECK_TOTAL_S (default 400 s,
# 20 s short of 7 minutes: the summary and the kill grace fit in them), so the whole check ends
# in time whatever hangs. The tables each bench writes (bench/results/*_gpu.md) are copied into
# $OUT after their step, also after a failed one (bench_train.py writes a row per run, a failed
# run's saying so: an out-of-memory of the plain torch loop keeps the DeepSpeed row);
# $OUT/summary.md lists each step's exit code (124: its timeout) and wall time. A failing step
# does not stop the ones after it.
#
#   bash bench/build_wheels.sh                  # here, once: .whl for the device's Python 3.12
#   bash bench/gpu_check.sh                     # there; OUT defaults to ./gpu_results
#   GPU_CHECK_DRY=1 bash bench/gpu_check.sh     # on a CPU machine: the same sequence, tiny settings
#
# The dry run of a bare machine: a fresh venv with torch (and the torchvision that matches it)
# only, `WHEEL_PYTHON=3.11 bash bench/build_wheels.sh` for this machine's Python, then
# `GPU_CHECK_DRY=1 PYTHON=venv/bin/python bash bench/gpu_check.sh`.
#
# Why batch 64 for the headline row: it is bench_train.py's CUDA default for the authors'
# preset, so the row stays comparable with earlier bench/results/train_gpu.md, and its GEMMs
# (64 x 256 = 16k tokens by 768..3072) are already large enough to keep an H100/H200 busy;
# it uses a small part of the memory (172M parameters with fp32 master weights and AdamW
# states are ~3 GB, activations tens of GB at most). Step 5 (GPU_CHECK_FILL_BATCH, default 256)
# is the "fills memory" point: it is last, so an out-of-memory there costs no other result.

set -uo pipefail  # no -e: every step runs, whatever the previous one returned

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO="$PWD"
OUT="${OUT:-$REPO/gpu_results}"
mkdir -p "$OUT"
DRY="${GPU_CHECK_DRY:-0}"
SITE="${GPU_CHECK_SITE:-/tmp/site}"
TOTAL_S="${GPU_CHECK_TOTAL_S:-400}"
BATCH="${GPU_CHECK_BATCH:-64}"
FILL_BATCH="${GPU_CHECK_FILL_BATCH:-256}"

# The repo's venv where it runs (this machine), else the device machine's python3 (torch).
if [[ -n "${PYTHON:-}" ]]; then
  PY="$PYTHON"
elif [[ -x .venv/bin/python ]] && .venv/bin/python -c "import torch" 2>/dev/null; then
  PY="$REPO/.venv/bin/python"
else
  PY="$(command -v python3)"
fi
# bld_t2i is importable from the checkout even where it is not pip-installed.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# DeepSpeed's JIT-built ops: the venv's own cache where there is one (as the Makefile sets
# it; another folder rebuilds the CPU op, ~50 s), a scratch folder on the device machine.
if [[ "$PY" == "$REPO/.venv/bin/python" ]]; then
  export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$REPO/.venv/torch_extensions}"
else
  export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}"
fi

SUMMARY="$OUT/summary.md"
START=$SECONDS
DEADLINE=$((START + TOTAL_S))
{
  echo "# GPU check $(date -u +%FT%TZ)"
  echo
  echo "- host $(hostname), python $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])' 2>&1))"
  echo "- commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' + local changes')"
  echo "- dry run: $DRY; batch $BATCH, fill batch $FILL_BATCH; $TOTAL_S s in all"
  echo
  echo "| step | exit | seconds | timeout | log | note |"
  echo "|---|---|---|---|---|---|"
} >"$SUMMARY"

# step NAME TIMEOUT_S CMD...: run CMD under its own timeout, cut to what is left before the
# deadline (TERM, then KILL 5 s later; timeout signals CMD's whole process group, so
# torchrun's ranks go too), log to $OUT/NAME.log, append one summary row.
step() {
  local name="$1" limit="$2"
  shift 2
  local log="$OUT/$name.log" t0=$SECONDS rc note="" left=$((DEADLINE - SECONDS - 5))
  ((left < limit)) && limit=$left
  if ((limit < 5)); then
    echo "[gpu_check] $name: skipped, the check's $TOTAL_S s are spent"
    echo "| $name | - | 0 | 0 | - | skipped: out of time |" >>"$SUMMARY"
    LAST_RC=124
    return
  fi
  echo "[gpu_check] $(date -u +%TZ) $name (timeout ${limit}s): $*"
  echo "\$ $*" >"$log"
  timeout --kill-after=5 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  LAST_RC=$rc
  echo "[gpu_check] $name: exit $rc after $((SECONDS - t0)) s"
  case "$rc" in
    0) ;;
    124 | 137) note="timed out" ;;
    5) [[ "$name" == gpu-tests ]] && note="pytest collected no tests" ;;
    *) note="failed: see the log's end" ;;
  esac
  echo "| $name | $rc | $((SECONDS - t0)) | $limit | $name.log | $note |" >>"$SUMMARY"
}

# The tests that exercise CUDA: the files that mark tests `gpu` (pyproject.toml's marker:
# test_step_syncs.py) or pick CUDA when it is there (test_sampling_cache.py compiles the
# pipeline on it), slow ones left out. Without any such file, `-m gpu` over tests/, which then reports
# exit 5 (nothing collected) rather than running the whole suite.
mapfile -t GPU_TEST_ARGS < <(grep -lE 'pytest\.mark\.gpu|torch\.cuda\.is_available\(\)' tests/test_*.py)
if ((${#GPU_TEST_ARGS[@]})); then GPU_TEST_ARGS=(-m "not slow" "${GPU_TEST_ARGS[@]}"); else GPU_TEST_ARGS=(-m gpu tests); fi

preflight() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "nvidia-smi: not available"
  "$PY" - <<'EOF'
import importlib
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
missing = []
# what the steps import (not transformers or wandb: no step builds an hf encoder or logs to wandb)
for name in ("deepspeed", "pytest", "pytest_timeout", "safetensors", "torchvision", "webdataset", "open_clip",
             "yaml", "PIL", "bld_t2i.training.t2i", "bld_t2i.pipeline"):
    try:
        importlib.import_module(name)
    except Exception as e:  # an ImportError, or a package that fails while importing
        missing.append(f"{name} ({type(e).__name__}: {e})")
print("missing:", "; ".join(missing) if missing else "none")
raise SystemExit(1 if missing else 0)
EOF
}
# --no-deps/--no-index: nothing can be fetched there; each wheel names its own version.
install() {
  compgen -G ".whl/*.whl" >/dev/null || { echo "no .whl/*.whl: run bench/build_wheels.sh here first"; exit 1; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
}
# timeout runs programs, not shell functions: the steps run them in a child bash.
export -f preflight install
export PY SITE

# The wheels first, for every later step; their console scripts (ninja, which DeepSpeed's JIT
# builds call) in $SITE/bin.
step install 45 bash -c install
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"

# bench_sampling.py's GPU mode: the flag its --help shows (asked after the install: --help
# imports bld_t2i); plainly otherwise, which picks the GPU figures by itself when CUDA is
# available. 3 repeats: compiling with CUDA graphs takes most of the step's time.
if timeout 30 "$PY" bench/bench_sampling.py --help 2>/dev/null | grep -q -- '--gpu'; then
  SAMPLING_GPU=(--gpu --repeats 3)
else
  SAMPLING_GPU=()
fi

if [[ "$DRY" == 1 ]]; then
  # Same sequence and flags at tiny sizes on the CPU. The benches write their tables into a
  # throw-away copy of bench/ so the checked-in bench/results/*_cpu.md stay as they are.
  BENCH="$OUT/dry_bench"
  rm -rf "$BENCH" && mkdir -p "$BENCH" && cp bench/*.py "$BENCH/"
  step preflight 60 bash -c preflight
  step gpu-tests 60 "$PY" -m pytest -q -p no:cacheprovider --collect-only "${GPU_TEST_ARGS[@]}"
  step train-b64 180 "$PY" "$BENCH/bench_train.py" --device cpu --precision fp32 --presets tiny \
    --batch 4 --steps 1 --warmup 1 --procs 1
  [[ -f "$BENCH/results/train_cpu.md" ]] && cp "$BENCH/results/train_cpu.md" "$OUT/train_cpu_b4.md"
  # The GPU modes need CUDA: check that the flags the real run passes parse.
  step sampling 30 "$PY" "$BENCH/bench_sampling.py" "${SAMPLING_GPU[@]}" --help
  step train-fill 30 "$PY" "$BENCH/bench_train.py" --device cuda --precision bf16 --presets authors \
    --batch "$FILL_BATCH" --procs 1 --steps 5 --help
else
  # The tables are removed before their step, so that a table copied after it is this run's.
  rm -f bench/results/train_gpu.md bench/results/sampling_gpu.md
  step preflight 30 bash -c preflight
  step gpu-tests 90 "$PY" -m pytest -q -rs -p no:cacheprovider -o addopts="" "${GPU_TEST_ARGS[@]}"
  # --procs 1: the extra multi-process run is for the tiny preset only, and there is one GPU.
  step train-b64 80 "$PY" bench/bench_train.py --device cuda --precision bf16 --presets authors \
    --batch "$BATCH" --procs 1
  [[ -f bench/results/train_gpu.md ]] && mv bench/results/train_gpu.md "$OUT/train_gpu_b$BATCH.md"
  step sampling 90 "$PY" bench/bench_sampling.py "${SAMPLING_GPU[@]}"
  [[ -f bench/results/sampling_gpu.md ]] && cp bench/results/sampling_gpu.md "$OUT/"
  step train-fill 55 "$PY" bench/bench_train.py --device cuda --precision bf16 --presets authors \
    --batch "$FILL_BATCH" --procs 1 --steps 5
  [[ -f bench/results/train_gpu.md ]] && cp bench/results/train_gpu.md "$OUT/train_gpu_b$FILL_BATCH.md"
  # Any other table written for the GPU (none but these today).
  for f in bench/results/*_gpu.md; do
    [[ -f "$f" && ! "$(basename "$f")" =~ ^(train|sampling)_gpu.md$ ]] && cp "$f" "$OUT/"
  done
fi

# The device tool brings back at most 8 files from $OUT: the preflight (and wheel install)
# logs go into the summary instead of files of their own.
{
  echo
  echo "Total $((SECONDS - START)) s. Tables: $(cd "$OUT" && ls -- *.md 2>/dev/null | grep -v '^summary.md$' | tr '\n' ' ')"
  for f in "$OUT/install.log" "$OUT/preflight.log"; do
    [[ -f "$f" ]] || continue
    printf '\n## %s\n\n```\n%s\n```\n' "$(basename "$f")" "$(cat "$f")"
    rm -f "$f"
  done
} >>"$SUMMARY"
cat "$SUMMARY"
