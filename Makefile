# Two commands for a fresh machine (Python 3.10+, no GPU, no Docker, no hub access needed):
#   make serve   prepare the default models and serve them (Triton + the HTTP adapter)
#   make test    run the test suite
# Both install what is missing into .venv first.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
PYTEST_ARGS ?=
HOST ?= 127.0.0.1
PORT ?= 8080
# Models to serve instead of the defaults: checkpoints (their config.json picks the architecture),
# model folders, or FOLDER=CHECKPOINT: MODELS="BAAI/bge-reranker-v2-m3 /data/my-classifier"
MODELS ?=
# Model parameters: SET="BAAI/bge-reranker-v2-m3.served_model_name=reranker /data/x.dtype=float16"
SET ?=

.PHONY: install serve test test-unit test-integration bench clean

install: $(INSTALLED)

$(INSTALLED): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch==2.13.0 is the CPU wheel on CI machines' disk; where torch is already there (the
	# GPU image) nothing is reinstalled.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install --no-build-isolation -e ".[runtime,test]"
	$(PY) -m pip install --no-deps nvidia-pytriton==0.7.0
	# The Triton stub ignores PYTHONPATH: it imports from this venv, so the project root goes
	# into the venv's site-packages as a .pth.
	$(PY) -c "import sysconfig, pathlib; pathlib.Path(sysconfig.get_paths()['purelib'], 'project_root.pth').write_text('$(CURDIR)\n')"
	touch $@

serve: $(INSTALLED)
	$(PY) -m adapter.stack --host $(HOST) --port $(PORT) $(foreach m,$(MODELS),--model '$(m)') $(foreach s,$(SET),--set '$(s)')

test: $(INSTALLED)
	$(PY) -m pytest -q --durations=10 $(PYTEST_ARGS)

test-unit: $(INSTALLED)
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

test-integration: $(INSTALLED)
	$(PY) -m pytest -q -m integration $(PYTEST_ARGS)

bench: $(INSTALLED)
	if $(PY) -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then \
		$(PY) -m benchmarks.bench_kernels --out benchmarks/results --commit $$(git rev-parse --short HEAD) && \
		$(PY) -m benchmarks.bench_engine --out benchmarks/results --commit $$(git rev-parse --short HEAD) && \
		$(PY) -m benchmarks.profile_engine --out benchmarks/results --commit $$(git rev-parse --short HEAD) && \
		$(PY) -m benchmarks.bench_systems --out benchmarks/results --instance-counts 1 2 --commit $$(git rev-parse --short HEAD) && \
		$(PY) -m benchmarks.profile_stack --out benchmarks/results --models ms-marco-MiniLM-L6 bge-reranker-v2-m3 --instance-counts 1 2 --commit $$(git rev-parse --short HEAD) && \
		$(PY) -m benchmarks.bench_llm_rerankers --out benchmarks/results --pin-cpus --commit $$(git rev-parse --short HEAD) && \
		$(PY) -m benchmarks.bench_reliability --out benchmarks/results --name h200 --random-checkpoints --commit $$(git rev-parse --short HEAD); \
	else \
		$(PY) -m benchmarks.bench_engine --smoke --out .cache/bench-smoke && \
		$(PY) -m benchmarks.bench_systems --smoke --out .cache/bench-smoke && \
		$(PY) -m benchmarks.bench_llm_rerankers --smoke --out .cache/bench-smoke && \
		$(PY) -m benchmarks.bench_reliability --smoke --out .cache/bench-smoke; \
	fi

clean:
	rm -rf $(VENV) .cache .pytest_cache
