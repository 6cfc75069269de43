# Two commands do all the set-up on a fresh machine: `make demo` and `make test` (each creates .venv and installs
# what it needs).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TCL := $(VENV)/bin/tcl

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

# The main job: a real fine-tune of ImageNet MobileNet V1 on the shipped dogs/cats sample, printing the report.
demo: $(VENV)/.installed
	$(TCL) finetune configs/sample_dogs_cats.yaml --force

test: $(VENV)/.installed
	$(PY) -m pytest -q

# Benchmarks print ratios against numpy / PyTorch measured in the same run (PyTorch: pip install torch==2.13.0).
bench: $(VENV)/.installed
	$(PY) bench/bench_gemm.py
	$(PY) bench/bench_depthwise.py
	$(PY) bench/bench_mobilenet.py --rounds 3 --markdown bench/results/bench_mobilenet.md | tee bench/results/bench_mobilenet.txt

.PHONY: install demo test bench
