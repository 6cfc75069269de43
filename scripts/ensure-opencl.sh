#!/bin/sh
# Run by `make install` (and so by `make demo` / `make test`) after pip: checks that an OpenCL device can compile
# tcl's kernels. PyPI's PoCL 3.0 (LLVM 14) cannot compile for processors newer than its LLVM (AMD Zen 4/5 among
# them: "unknown target CPU 'generic'"); the distribution's PoCL can, and tcl finds and prefers it. As root on
# Debian/Ubuntu this installs it (pocl-opencl-icd); otherwise it prints the command. It never fails the install:
# tcl then explains the same at its first build, and `--device numpy` still works.
PY="${1:-.venv/bin/python}"
probe() {
  "$PY" - <<'PYEOF'
import sys
from transfercl_cli.errors import TclError
from transfercl_cli.runtime import UNKNOWN_CPU, compiler_error, list_devices
try:
    devs = list_devices()
except TclError:
    sys.exit(0)  # no OpenCL platform at all: `tcl doctor` explains; not this script's case
errors = [compiler_error(d) for d in devs]
sys.exit(0 if any(e is None for e in errors) else 3 if any(UNKNOWN_CPU in (e or "") for e in errors) else 0)
PYEOF
}
probe && exit 0
[ $? -eq 3 ] || exit 0
echo "ensure-opencl: this machine's OpenCL (PyPI's PoCL) cannot compile for its processor (unknown target CPU)." >&2
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "ensure-opencl: installing the distribution's PoCL (apt-get install pocl-opencl-icd)" >&2
  export DEBIAN_FRONTEND=noninteractive
  if (apt-get install -y -qq pocl-opencl-icd >/dev/null 2>&1 \
      || (apt-get update -qq && apt-get install -y -qq pocl-opencl-icd >/dev/null)) && probe; then
    echo "ensure-opencl: done; tcl now uses it" >&2
    exit 0
  fi
  echo "ensure-opencl: that did not help; see \`tcl doctor\`" >&2
else
  echo "ensure-opencl: install your distribution's PoCL, which tcl then prefers:" >&2
  echo "  Debian/Ubuntu: sudo apt-get install pocl-opencl-icd    Fedora: sudo dnf install pocl" >&2
fi
exit 0
