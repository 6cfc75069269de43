#!/usr/bin/env bash
# A nightly on-device personalization job for cron or termux-job-scheduler: fine-tune on the day's labelled
# images, evaluate, export. No prompts; logs to a file; exit code 0 only when every step succeeded.
#   scripts/nightly-personalize.sh RECIPE [RUN_ROOT]
# Exit codes: 0 ok, 2 bad input or environment (tcl's message is in the log), 3 accuracy below MIN_ACCURACY.
set -uo pipefail
recipe=${1:?usage: nightly-personalize.sh RECIPE [RUN_ROOT]}
root=${2:-$HOME/tcl-runs}
min_accuracy=${MIN_ACCURACY:-0.0}
stamp=$(date +%Y%m%d-%H%M%S)
run="$root/$stamp"
log="$root/$stamp.log"
mkdir -p "$root"

# tcl: $TCL if set, else the one on PATH, else this clone's .venv/bin/tcl (what `make demo` installs; cron's PATH
# has neither ~/.local/bin nor an activated virtual environment).
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -n "${TCL:-}" ]; then
  tcl=$TCL
elif command -v tcl >/dev/null 2>&1; then
  tcl=$(command -v tcl)
elif [ -x "$here/.venv/bin/tcl" ]; then
  tcl="$here/.venv/bin/tcl"
else
  echo "tcl not found: not on PATH and no $here/.venv/bin/tcl. Run \`make install\` in the clone (or set TCL=/path/to/tcl)." >&2
  exit 2
fi
# The Python next to tcl (its own environment) reads the report; else python3.
py=$(dirname "$(readlink -f "$tcl" 2>/dev/null || echo "$tcl")")/python
[ -x "$py" ] || py=python3

{
  echo "== $(date) finetune $recipe -> $run"
  echo "== tcl: $tcl"
  "$tcl" finetune "$recipe" --output "$run" --quiet || exit $?
  echo "== evaluate"
  "$tcl" evaluate "$run" --json > "$run/evaluate.json" || exit $?
  echo "== export"
  "$tcl" export-weights "$run" --format onnx --force || exit $?
  "$tcl" export-weights "$run" --format npz --force || exit $?
} >>"$log" 2>&1
rc=$?
if [ $rc -ne 0 ]; then
  echo "tcl failed with exit code $rc; see $log" >&2
  exit $rc
fi
acc=$("$py" -c "import json,sys; print(json.load(open(sys.argv[1]))['metrics']['accuracy'])" "$run/evaluate.json")
echo "accuracy $acc ($run)" | tee -a "$log"
"$py" -c "import sys; sys.exit(0 if float(sys.argv[1]) >= float(sys.argv[2]) else 3)" "$acc" "$min_accuracy"
