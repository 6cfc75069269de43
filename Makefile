# Two commands do all the set-up on a fresh machine: `make demo` and `make test` (each creates .venv and installs
# what it needs).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TCL := $(VENV)/bin/tcl

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q '.[test]'
	touch $@

install: $(VENV)/.installed

# The main job: a real fine-tune of ImageNet MobileNet V1 on the shipped dogs/cats sample, printing the report.
demo: $(VENV)/.installed
	$(TCL) finetune configs/sample_dogs_cats.yaml

test: $(VENV)/.installed
	$(PY) -m pip install -q --no-deps --force-reinstall . >/dev/null
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) bench/bench_gemm.py
	$(PY) bench/bench_depthwise.py

.PHONY: install demo test bench
