# Two commands do all the set-up on a fresh machine: `make demo` and `make test` (each creates .venv and installs
# what it needs). `tcl` itself then lives in .venv/bin: `. .venv/bin/activate` puts it on PATH in one shell,
# `make install-user` links it into a folder on PATH for good.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TCL := $(VENV)/bin/tcl
# Where `make install-user` links tcl: Termux's $PREFIX/bin (on PATH there), else ~/.local/bin (on PATH on Debian
# and Ubuntu once it exists, from the next login: ~/.profile adds it).
ifneq ($(findstring com.termux,$(PREFIX)),)
BINDIR ?= $(PREFIX)/bin
else
BINDIR ?= $(HOME)/.local/bin
endif

# setuptools >= 77 reads pyproject.toml's SPDX `license = "MIT"` (also for builds without isolation, as the wheel
# test makes).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 'setuptools>=77'
	$(PY) -m pip install -q -e '.[test]'
	@sh scripts/ensure-opencl.sh $(PY)
	touch $@

install: $(VENV)/.installed

# The main job: a real fine-tune of ImageNet MobileNet V1 on the shipped dogs/cats sample, printing the report.
demo: $(VENV)/.installed
	$(TCL) finetune configs/sample_dogs_cats.yaml --force
	@$(MAKE) -s --no-print-directory path-hint

# How to run the README's `tcl ...` examples from here.
path-hint:
	@echo ""
	@echo "tcl is installed in $(CURDIR)/$(VENV)/bin. To run the README's tcl commands:"
	@echo "  . $(VENV)/bin/activate    # puts tcl on PATH in this shell (again in each new shell)"
	@echo "  make install-user         # once: links tcl into $(BINDIR), for every shell and for cron"
	@echo "  or call it by its path:   $(CURDIR)/$(TCL) --help"

# A link, not `pip install --user`: Debian's system Python refuses user installs (PEP 668, externally managed),
# and the link needs nothing but this clone's .venv (keep the clone where it is; `make uninstall-user` removes it).
install-user: $(VENV)/.installed
	@mkdir -p "$(BINDIR)"
	@ln -sfn "$(CURDIR)/$(TCL)" "$(BINDIR)/tcl"
	@echo "linked $(BINDIR)/tcl -> $(CURDIR)/$(TCL)"
	@case ":$$PATH:" in *":$(BINDIR):"*) echo "$(BINDIR) is on PATH: run tcl --help";; \
	  *) echo "$(BINDIR) is not on PATH in this shell: add this line to ~/.profile (or ~/.bashrc) and open a new shell:"; \
	     echo "  export PATH=\"$(BINDIR):\$$PATH\"";; esac

uninstall-user:
	@if [ -L "$(BINDIR)/tcl" ] && [ "$$(readlink "$(BINDIR)/tcl")" = "$(CURDIR)/$(TCL)" ]; then \
	  rm "$(BINDIR)/tcl" && echo "removed $(BINDIR)/tcl"; else echo "$(BINDIR)/tcl is not this clone's link"; fi

test: $(VENV)/.installed
	$(PY) -m pytest -q

# Benchmarks print ratios against numpy / PyTorch measured in the same run (PyTorch: pip install torch==2.13.0).
bench: $(VENV)/.installed
	$(PY) bench/bench_gemm.py
	$(PY) bench/bench_depthwise.py
	$(PY) bench/bench_mobilenet.py --rounds 3 --markdown bench/results/bench_mobilenet.md | tee bench/results/bench_mobilenet.txt
	@$(MAKE) -s --no-print-directory bench-int8
	@$(MAKE) -s --no-print-directory bench-zoo

# Static int8 ONNX against float32 in onnxruntime (issue 16; onnxruntime comes with the test extras) on the demo run.
bench-int8: $(VENV)/.installed
	test -d runs/sample_dogs_cats || $(TCL) finetune configs/sample_dogs_cats.yaml
	$(PY) bench/bench_int8.py --json bench/results/bench_int8.json | tee bench/results/bench_int8.txt

# tcl against onnxruntime and PyTorch on twelve architectures (issue 15): needs torch, torchvision and onnxruntime,
# kept out of .venv; BENCH_PY is a Python that has them and tcl (bench/bench_zoo.py's docstring: set-up).
BENCH_PY ?= /work/zoo-venv/bin/python
bench-zoo:
	$(BENCH_PY) bench/bench_zoo.py --markdown bench/results/bench_zoo.md

.PHONY: install demo path-hint install-user uninstall-user test bench bench-int8 bench-zoo
