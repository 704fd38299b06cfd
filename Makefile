# Two commands do all set-up on a fresh machine: `make test` and `make demo`.
# Set-up is idempotent: each step leaves a stamp and is skipped when its inputs are unchanged.

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The venv's tools first: its ninja builds DeepSpeed's JIT op; a different ninja on another
# PATH would discard the build log and rebuild the op on every start.
export PATH := $(abspath $(VENV))/bin:$(PATH)
# DeepSpeed JIT-compiles a CPU shared-memory op on first use (~50 s); keep it in a stable
# cache of this venv's own: its build file names the venv's paths, so two venvs sharing one
# cache would rebuild it for each other on every start.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
# Debian packages the tests and the demo use: a real local SLURM cluster, real emoji and
# Fashion-MNIST images, and Chromium to render the evaluation report.
SYSTEM_PACKAGES := munge slurmctld slurmd slurm-client fonts-noto-color-emoji dataset-fashion-mnist chromium unicode-data

.PHONY: setup system-deps test demo bench gpu-check clean

setup: system-deps $(VENV)/.installed $(TORCH_EXTENSIONS_DIR)/.built

# DeepSpeed's CPU accelerator JIT-builds a shared-memory all-reduce op when it initialises
# (~50 s). Build it once here, so the tests' and the demo's ranks find it ready.
$(TORCH_EXTENSIONS_DIR)/.built: $(VENV)/.installed
	@echo "[setup] building DeepSpeed's CPU communication op into $(TORCH_EXTENSIONS_DIR)"
	@$(PY) -c "from deepspeed.accelerator import get_accelerator as g; b = g().create_op_builder('ShareMemCommBuilder'); b is None or b.load()" 2>&1 | grep -v "Warning\|WARNING"; exit $${PIPESTATUS[0]}
	@mkdir -p $(@D) && touch $@

system-deps:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "[setup] installing system packages: $$missing"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# pip's -q still prints one warning per missing local mirror folder on some machines: filter them.
QUIET_PIP = 2>&1 | grep -v "is ignored: it is neither a file nor a directory"; exit $${PIPESTATUS[0]}

$(VENV)/.installed: pyproject.toml constraints.txt
	@[ -x $(PY) ] || python3 -m venv $(VENV)
	@echo "[setup] installing torch, DeepSpeed and bld_t2i into $(VENV)"
	@$(PIP) install -q --upgrade pip setuptools wheel $(QUIET_PIP)
	@$(PIP) install -q torch torchvision $(QUIET_PIP)
	@# DeepSpeed builds from source; DS_BUILD_OPS=0 defers its C++ ops to JIT on first use.
	@DS_BUILD_OPS=0 $(PIP) install -q --no-build-isolation "deepspeed>=0.19.0" $(QUIET_PIP)
	@# the package's own dependencies are ranges; constraints.txt pins the tested set (and spares
	@# pip minutes of backtracking over the s3fs/aiobotocore/botocore line)
	@$(PIP) install -q -c constraints.txt -e ".[test,metrics,tables,demo]" $(QUIET_PIP)
	@touch $@

test: setup lint
	$(PY) -m pytest -q tests

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

demo: setup
	$(PY) data_tools/demo.py

bench: setup
	$(PY) bench/run_all.py

# On a CUDA machine (no `setup`: it may lack the internet and the venv): GPU tests and the
# GPU benches within 7 minutes, results in $(OUT) (bench/gpu_check.sh; GPU_CHECK_DRY=1 on a CPU).
# It installs ./.whl first: `bash bench/build_wheels.sh` on a machine with the internet.
OUT ?= gpu_results
gpu-check:
	OUT=$(abspath $(OUT)) bash bench/gpu_check.sh

clean:
	rm -rf runs/ .pytest_cache
