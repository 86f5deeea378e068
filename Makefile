# `make demo` and `make test` do all set-up on a fresh machine: a virtualenv in .venv, CPU torch
# (pinned here only; setup.py keeps a range so GPU users keep their own build), then the extras.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[megatron,deepspeed,energy,test]'
	touch $(STAMP)

demo: install
	$(PY) examples/ffn_demo.py

test: install
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
