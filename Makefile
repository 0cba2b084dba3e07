# Two commands for a fresh machine (Python 3.10+, no GPU, no Docker, no hub access needed):
#   make serve   prepare the default models and serve them (Triton + the HTTP adapter): `poolserve serve`
#   make test    run the test suite
# Both install what is missing into .venv first: `serve` the runtime alone, `test` the test tools too.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
# What `make serve` needs (RUNTIME_LOCK: the runtime at the full lock's versions, no test or bench tools).
RUNTIME_INSTALLED := $(VENV)/.installed-runtime
PYTEST_ARGS ?=
HOST ?= 127.0.0.1
PORT ?= 8080
# Models to serve instead of the defaults: checkpoints (their config.json picks the architecture),
# model folders, or FOLDER=CHECKPOINT: MODELS="BAAI/bge-reranker-v2-m3 /data/my-classifier"
MODELS ?=
# Model parameters: SET="BAAI/bge-reranker-v2-m3.served_model_name=reranker /data/x.dtype=float16"
SET ?=
LOCK ?= requirements/lock.txt
# The GPU image's runtime-only counterpart of lock-gpu-image.txt: RUNTIME_LOCK=requirements/image-gpu.txt.
RUNTIME_LOCK ?= requirements/image.txt
# torch 2.13.0+cpu: from this machine's disk where it lies there, else from PyTorch's CPU index.
TORCH_SOURCE ?= $(if $(wildcard /opt/wheels/torch-2.13.0+cpu-*),,--extra-index-url https://download.pytorch.org/whl/cpu)
UV_VERSION := 0.13.9
UV := .cache/tools/bin/uv
LOCK_INPUTS := pyproject.toml requirements/build.in --extra runtime --extra test --extra bench
IMAGE_INPUTS := pyproject.toml requirements/build.in --extra runtime
# The adapter image: pyproject.toml's core dependencies alone (no torch, no triton).
ADAPTER_IMAGE_INPUTS := pyproject.toml requirements/build.in
NO_TORCH := --no-emit-package torch --no-emit-package triton
# --find-links: where this machine keeps torch 2.13.0+cpu (PyTorch's CPU index is not reachable here).
LOCK_FLAGS := --python-version 3.11 --python-platform x86_64-manylinux_2_35 --generate-hashes \
	--override requirements/torch-cpu.in --find-links /opt/wheels --annotation-style line --quiet

.PHONY: install lock check-latest lint serve test test-unit test-integration bench images clean

install: $(INSTALLED)

# Everything installs from the lock (requirements/lock.txt, hashes checked): CPython 3.11 on Linux
# x86_64, torch 2.13.0+cpu (on CI machines' disk; elsewhere from download.pytorch.org/whl/cpu).
# An environment that brings its own torch and triton (the GPU image) uses
# LOCK=requirements/lock-gpu-image.txt; the Docker images install requirements/image*.txt (the
# triton image the runtime, the adapter image the core dependencies without torch; same versions).
# `make lock` refreshes them all from pyproject.toml's ranges.
$(INSTALLED): $(LOCK) requirements/tritonserver.txt pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --require-hashes -r $(LOCK) $(TORCH_SOURCE)
	$(PY) -m pip install -q --no-deps --require-hashes -r requirements/tritonserver.txt
	# The project itself, editable: the Triton stub imports it from this venv like any installed
	# package (its poolserve_* packages live in the card folders; see pyproject.toml).
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@ $(RUNTIME_INSTALLED)  # the full lock holds the runtime's, at the same versions

# The runtime alone, from RUNTIME_LOCK (a subset of the full lock at its versions): what `make serve` needs.
$(RUNTIME_INSTALLED): $(RUNTIME_LOCK) requirements/tritonserver.txt pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --require-hashes -r $(RUNTIME_LOCK) $(TORCH_SOURCE)
	$(PY) -m pip install -q --no-deps --require-hashes -r requirements/tritonserver.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

# Resolve the newest versions pyproject.toml allows into the locks (uv, pinned, in .cache/tools).
lock: $(UV)
	$(UV) pip compile $(LOCK_INPUTS) $(LOCK_FLAGS) -o requirements/lock.txt
	$(UV) pip compile $(LOCK_INPUTS) $(LOCK_FLAGS) $(NO_TORCH) -o requirements/lock-gpu-image.txt
	# The images, at the versions of the full lock: triton's the runtime, the adapter's no torch.
	$(UV) pip compile $(IMAGE_INPUTS) $(LOCK_FLAGS) -c requirements/lock.txt -o requirements/image.txt
	$(UV) pip compile $(IMAGE_INPUTS) $(LOCK_FLAGS) -c requirements/lock.txt $(NO_TORCH) -o requirements/image-gpu.txt
	$(UV) pip compile $(ADAPTER_IMAGE_INPUTS) $(LOCK_FLAGS) -c requirements/lock.txt -o requirements/image-adapter.txt
	$(UV) pip compile requirements/tritonserver.in $(LOCK_FLAGS) --no-deps -o requirements/tritonserver.txt

$(UV):
	$(PYTHON) -m venv .cache/tools
	.cache/tools/bin/pip install -q uv==$(UV_VERSION)

# The newest releases pyproject.toml allows, in a throwaway venv: unit tests and one real-stack test.
check-latest:
	$(PYTHON) -m venv --clear .cache/latest
	.cache/latest/bin/pip install -q "setuptools>=70.1" -c requirements/torch-cpu.in torch $(TORCH_SOURCE)
	# torch stays the CPU build (a newer torch is a several-GB CUDA download; the GPU image has its own).
	.cache/latest/bin/pip install -q --upgrade --upgrade-strategy eager --no-build-isolation \
		-c requirements/torch-cpu.in -e ".[runtime,test]"
	.cache/latest/bin/pip install -q --no-deps nvidia-pytriton==0.7.0
	.cache/latest/bin/pip list --format=freeze > .cache/latest/versions.txt
	.cache/latest/bin/python -m pytest -q -p no:cacheprovider tests/unit tests/kernels \
		tests/integration/test_adapter_api.py $(PYTEST_ARGS)

# `poolserve serve` (the console script of `pip install .`) with MODELS as its models and SET as --set.
serve: $(RUNTIME_INSTALLED)
	$(VENV)/bin/poolserve serve --stop-with-parent --host $(HOST) --port $(PORT) $(foreach m,$(MODELS),'$(m)') $(foreach s,$(SET),--set '$(s)')

# ruff's rules and scope: pyproject.toml [tool.ruff]. A second or two; it runs before every `make test`.
lint: $(INSTALLED)
	$(VENV)/bin/ruff check .

test: $(INSTALLED) lint
	$(PY) -m pytest -q --durations=10 $(PYTEST_ARGS)

# No server: a test outside the integration and compose markers that starts one fails (tests/conftest.py).
test-unit: $(INSTALLED)
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

# Every test that starts tritonserver, the adapter or `make serve` (tests/integration/).
test-integration: $(INSTALLED)
	$(PY) -m pytest -q -m integration $(PYTEST_ARGS)

bench: $(INSTALLED)
	if $(PY) -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then \
		$(PY) -m poolserve_bench.bench_kernels --out benchmarks/results --commit $$(git rev-parse --short HEAD) && \
		$(PY) -m poolserve_bench.bench_engine --out benchmarks/results --commit $$(git rev-parse --short HEAD) && \
		$(PY) -m poolserve_bench.profile_engine --out benchmarks/results --commit $$(git rev-parse --short HEAD) && \
		$(PY) -m poolserve_bench.bench_systems --out benchmarks/results --instance-counts 1 2 --commit $$(git rev-parse --short HEAD) && \
		$(PY) -m poolserve_bench.profile_stack --out benchmarks/results --models ms-marco-MiniLM-L6 bge-reranker-v2-m3 --instance-counts 1 2 --commit $$(git rev-parse --short HEAD) && \
		$(PY) -m poolserve_bench.bench_llm_rerankers --out benchmarks/results --pin-cpus --commit $$(git rev-parse --short HEAD) && \
		$(PY) -m poolserve_bench.bench_reliability --out benchmarks/results --name h200 --random-checkpoints --commit $$(git rev-parse --short HEAD) && \
		$(PY) -m poolserve_bench.bench_lora_fp8 --out benchmarks/results --commit $$(git rev-parse --short HEAD); \
	else \
		$(PY) -m poolserve_bench.bench_engine --smoke --out .cache/bench-smoke && \
		$(PY) -m poolserve_bench.bench_systems --smoke --out .cache/bench-smoke && \
		$(PY) -m poolserve_bench.bench_llm_rerankers --smoke --out .cache/bench-smoke && \
		$(PY) -m poolserve_bench.bench_reliability --smoke --out .cache/bench-smoke && \
		$(PY) -m poolserve_bench.bench_lora_fp8 --smoke --out .cache/bench-smoke; \
	fi

# Docker on a host that reaches no image registry: the compose images built on a local Debian base
# (debootstrap, root) from a wheelhouse of the locks' wheels; then `TRITON_SERVER=pytriton docker
# compose up`. BASE_IMAGE=python:3.11-slim uses that base instead (deploy/offline-images.sh).
images:
	PYTHON='$(PYTHON)' TORCH_SOURCE='$(TORCH_SOURCE)' deploy/offline-images.sh

clean:
	rm -rf $(VENV) .cache .pytest_cache
