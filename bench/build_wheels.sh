#!/bin/bash
# The wheels bench/gpu_check.sh installs on a bare GPU machine, into ./.whl (gitignored: the
# device tool carries it as an ignored path, `carry: [".whl"]`, 64 MiB together with the
# working tree).
#
#   bash bench/build_wheels.sh                      # for the device: CPython 3.12, x86-64 Linux
#   WHEEL_PYTHON=3.11 bash bench/build_wheels.sh    # for this machine's Python (the dry run)
#
# What is in it: every package the check's steps import beyond torch and what torch brings
# itself (filelock, fsspec, jinja2, networkx, sympy, typing-extensions, triton, nvidia-*), one
# version each (pip refuses two), the versions installed in $PYTHON (default .venv/bin/python,
# the environment `make setup` builds and the tests ran):
#   - DeepSpeed, built here: the package index has no binary wheel of it (`pip download
#     --only-binary` resolves to a 2020 build). DS_BUILD_OPS=0 makes a pure-Python wheel; its
#     C++/CUDA ops would be JIT-built at first use, and the trainer uses none (torch's AdamW).
#     Building imports torch, so $PYTHON must have it.
#   - the rest downloaded as binary wheels for WHEEL_PYTHON (default 3.12, the device's) and
#     manylinux x86-64, without their dependencies (each one needed is listed below).
# Not in it: torchvision, which must match the device's torch (the device image has 0.26.0
# beside torch 2.11.0; the dry run installs 0.29.1 beside 2.14.1 with torch), and transformers
# (Hugging Face text encoders: no step of the check builds one; the device image has it).
#
# Prints each wheel's size and the total, and fails above BUDGET_MIB (default 56: the device
# tool's 64 MiB less room for the working tree, ~2 MiB today).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-.venv/bin/python}"
WHEEL_PYTHON="${WHEEL_PYTHON:-3.12}"
OUT="${WHEEL_DIR:-.whl}"
BUDGET_MIB="${BUDGET_MIB:-56}"

# name (as pip knows it): why the check needs it
PACKAGES=(
  hjson einops msgpack ninja numpy packaging psutil py-cpuinfo tqdm  # DeepSpeed's requirements
  pydantic pydantic-core annotated-types typing-inspection          # DeepSpeed's config (pydantic 2)
  webdataset braceexpand pyyaml                                     # bld_t2i's shard reading, its config
  pillow safetensors                                                # images, weights
  open_clip_torch ftfy wcwidth regex                                # the tiny CLIP text tower of the GPU tests
  pytest pluggy iniconfig pygments pytest-timeout                   # the gpu-tests step
)

"$PY" -c "import torch" || { echo "build_wheels: $PY has no torch (DeepSpeed's build imports it); set PYTHON" >&2; exit 1; }
mapfile -t PINS < <("$PY" - "${PACKAGES[@]}" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version

for name in sys.argv[1:]:
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        sys.exit(f"build_wheels: {name} is not installed in {sys.executable}: the versions come from there")
EOF
)
DS_VERSION="$("$PY" -c 'from importlib.metadata import version; print(version("deepspeed"))')"

rm -rf "$OUT" && mkdir -p "$OUT"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
echo "[build_wheels] DeepSpeed $DS_VERSION from its sdist (DS_BUILD_OPS=0)"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation --no-binary deepspeed -w "$TMP" \
  "deepspeed==$DS_VERSION"
mv "$TMP"/deepspeed-*.whl "$OUT/"
case "$(basename "$OUT"/deepspeed-*.whl)" in
  *-py3-none-any.whl) ;;
  *) echo "build_wheels: DeepSpeed's wheel is not pure Python: $(ls "$OUT"/deepspeed-*.whl)" >&2; exit 1 ;;
esac

PLATFORMS=()
for n in 17 24 27 28 31 34 35 39; do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform linux_x86_64)
echo "[build_wheels] ${#PINS[@]} wheels for CPython $WHEEL_PYTHON, x86-64 Linux: ${PINS[*]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$WHEEL_PYTHON" --implementation cp \
  "${PLATFORMS[@]}" -d "$OUT" "${PINS[@]}"

ls -l "$OUT" | awk 'NR > 1 {printf "  %8.2f MiB  %s\n", $5 / 1048576, $9}'
total=$(du -cb "$OUT"/*.whl | tail -1 | cut -f1)
echo "[build_wheels] $(ls "$OUT"/*.whl | wc -l) wheels, $(awk "BEGIN {printf \"%.2f\", $total / 1048576}") MiB in $OUT"
if ((total > BUDGET_MIB * 1048576)); then
  echo "build_wheels: over the ${BUDGET_MIB} MiB budget (the device tool carries 64 MiB with the working tree)" >&2
  exit 1
fi
