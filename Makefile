# `make demo` and `make test` do all set-up on a fresh machine: a virtualenv in .venv, CPU torch
# (pinned here only; setup.py keeps a range so GPU users keep their own build), then the extras.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

# Second test leg: the whole suite against the newest releases the registry serves (torch,
# megatron-core, DeepSpeed, transformers, accelerate). megatron-core 0.17+ needs Python >= 3.12 (a
# 3.11 venv resolves megatron-core 0.16). A bare `torch` there is the CUDA build; it runs on CPU.
# PIP_CONSTRAINT=/dev/null: a pip constraints file that caps torch (as some machines' pip config
# does) would pin this leg to an old release; nothing is pinned here. PYTHON312 is found on PATH or
# in pyenv; empty means the leg is skipped, loudly.
VENV312 ?= .venv312
PY312 := $(VENV312)/bin/python
STAMP312 := $(VENV312)/.installed
PYTHON312 ?= $(shell for c in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12 /usr/local/bin/python3.12; do \
	$$c -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1 && { echo $$c; break; }; done)

.PHONY: install install312 demo test test-fast test311 test312 lint docs clean

install: $(STAMP)

$(STAMP): setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[megatron,deepspeed,energy,test,docs]'
	touch $(STAMP)

install312: $(STAMP312)

# torch first (DeepSpeed's build reads it); --upgrade-strategy eager takes the newest release of
# every dependency too, also when an older venv is refreshed.
$(STAMP312): setup.py Makefile
	$(PYTHON312) -m venv $(VENV312)
	$(PY312) -m pip install -q --upgrade pip
	PIP_CONSTRAINT=/dev/null $(PY312) -m pip install -q --upgrade --upgrade-strategy eager torch
	PIP_CONSTRAINT=/dev/null $(PY312) -m pip install -q --upgrade --upgrade-strategy eager \
		-e '.[megatron,deepspeed,hf,energy,test]'
	touch $(STAMP312)

demo: install
	$(PY) examples/ffn_demo.py

# Everything: lint, the documentation site (strict), then both test legs. Every part always runs;
# the target fails if any failed.
test:
	@rc=0; $(MAKE) --no-print-directory lint || rc=1; \
	$(MAKE) --no-print-directory docs || rc=1; \
	$(MAKE) --no-print-directory test311 || rc=1; \
	$(MAKE) --no-print-directory test312 || rc=1; exit $$rc

# Everyday subset: core math, bad input, conversion (tests marked `fast`; under 2 minutes here).
test-fast: install
	$(PY) -m pytest -q -m fast tests

lint: install
	$(PY) -m ruff check .

# The documentation site (MkDocs Material + mkdocstrings); --strict fails on a broken link or a
# missing reference. Output in site/.
docs: install
	$(PY) -m mkdocs build --strict --site-dir site

test311: install
	$(PY) -m pytest -q tests

test312:
ifeq ($(strip $(PYTHON312)),)
	@echo "################################################################"
	@echo "SKIPPED: python3.12 leg (no python3.12 found; the suite ran only"
	@echo "on the pinned torch 2.13 leg, not on the newest releases)"
	@echo "################################################################"
else
	$(MAKE) --no-print-directory install312
	$(PY312) -c 'import sys; from importlib.metadata import version as v; print("python3.12 leg: Python", sys.version.split()[0], *(f"{n} {v(n)}" for n in ("torch", "megatron-core", "deepspeed", "transformers", "accelerate")))'
	$(PY312) -m pytest -q tests
endif

clean:
	rm -rf $(VENV) $(VENV312) *.egg-info .pytest_cache site
