# The two commands a new user needs: `make demo` and `make test`. Both set up their own
# virtual environment (idempotently: the stamp file is only rebuilt when pyproject.toml changes).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# The CPU wheel of torch 2.13.0 lies on the dev/CI machines' disk; pinning it first keeps pip from
# resolving a multi-GB CUDA build for the `torch` requirement.
TORCH_PIN ?= torch==2.13.0
export OMP_NUM_THREADS ?= 1
export PYTHONUNBUFFERED := 1

.PHONY: demo test test-unit test-distributed test-slurm bench lint venv clean gpu-wheels gpu-check

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[dev]" "$(TORCH_PIN)"
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m megatron_alp.demo

# The lint first (seconds), then the suite; pytest prints the ten slowest tests (pyproject addopts).
# Two pytest-xdist workers: most of the suite waits (engines starting, SLURM jobs, processes
# joining worlds), so two workers overlap the waits on 2 cores. --dist loadscope keeps a module's
# tests on one worker, so its module-scoped fixtures (a SLURM cluster and its jobs, a converted
# checkpoint) are built once; the longest end-to-end runs are split across modules for balance.
# (Not --dist loadgroup: with pytest 9.2 xdist 3.8's group suffix no longer reaches the node id.)
TEST_WORKERS ?= 2
test: $(STAMP) lint
	@start=$$(date +%s); \
	$(PY) -m pytest tests -m "not scale" -n $(TEST_WORKERS) --dist loadscope; rc=$$?; \
	echo "test suite took $$(( $$(date +%s) - start )) s"; exit $$rc

test-unit: $(STAMP)
	$(PY) -m pytest tests/unit

test-distributed: $(STAMP)
	$(PY) -m pytest tests/distributed

# A real one-node SLURM (needs slurm-wlm + munge, as root: .ci/run installs them in CI; the tests
# skip with the reason otherwise), then sbatch jobs.
# The real-SLURM tests, the multi-minute scale scenarios included (make test leaves those out to
# stay under 8 minutes: tests/slurm/test_scale.py, about 20 minutes on a 2-core VM).
test-slurm: $(STAMP)
	$(PY) -m pytest tests/slurm tests/unit/test_launch_plan.py tests/unit/test_launch_engines.py

bench: $(STAMP)
	$(PY) -m bench.run_all

# Rules in pyproject.toml ([tool.ruff.lint]); the same hook for contributors: .pre-commit-config.yaml.
lint: $(STAMP)
	$(PY) -m ruff check megatron_alp rollout tools bench tests

# The GPU kit (docs/gpu.md). `gpu-wheels` (here, with network) downloads the cp312 manylinux wheels a
# lent GPU machine lacks (Python 3.12, torch 2.11; no network there); `gpu-check` (there) installs
# them into a private target dir and runs every GPU check under its own time limit (8 min in all).
GPU_WHEELS ?= gpu_wheels
GPU_WHEEL_REQS := megatron-core==0.16.1 math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2
GPU_PY ?= python3
gpu-wheels: $(STAMP)
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
		-d $(GPU_WHEELS) $(GPU_WHEEL_REQS)
	@ls -1 $(GPU_WHEELS)/*.whl && du -cb $(GPU_WHEELS)/*.whl | tail -1 | awk '{printf "total %.1f MiB\n", $$1/1048576}'

gpu-check:
	$(GPU_PY) -m bench.gpu_check --wheels $(GPU_WHEELS) $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) runs demo_out
