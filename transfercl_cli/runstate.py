"""A run directory's state (state.json): finished, or how far an unfinished run got.

`tcl finetune` writes it when the run starts, after every finished epoch and when the run ends, however it ends
(finished, interrupted, diverged, failed). A run killed outright (kill -9, power loss) keeps the state of its last
finished epoch with `state: training`. Readers (`evaluate`, `predict`, `export-weights`, a recipe that continues
from a run) use it so that an unfinished run is never served as a trained one: they take the last finished epoch's
weights and say so, or refuse when no epoch finished.
"""
import os
import warnings

from .errors import ModelError, TclNote
from .fsutil import load_json, write_json

STATE_FILE = "state.json"
FINISHED = "finished"
UNFINISHED = ("training", "interrupted", "diverged", "failed")


def write_state(run_dir, state, epochs_finished, epochs_planned, detail=None):
    """Record the run's state atomically. `epochs_finished`: 1-based count of epochs whose checkpoint is on disk."""
    write_json(os.path.join(run_dir, STATE_FILE), {
        "state": state, "epochs_finished": int(epochs_finished), "epochs_planned": int(epochs_planned),
        "detail": detail})


def read_state(run_dir):
    """The state dict, or None for a folder without state.json (a model directory, or a run from before states)."""
    path = os.path.join(run_dir, STATE_FILE)
    if not os.path.exists(path):
        return None
    st = load_json(path, "run state file", "Delete it to treat the run as finished, or re-run `tcl finetune` with "
                                           "--resume (or --force to start over).")
    if not isinstance(st, dict) or st.get("state") not in (FINISHED,) + UNFINISHED:
        from .errors import DamagedFile

        raise DamagedFile(f"The run state file '{path}' is damaged or not a file tcl wrote (no known 'state').",
                          "Delete it to treat the run as finished, or re-run `tcl finetune` with --resume.")
    return st


def describe(st):
    """'interrupted after epoch 2 of 10' and the like."""
    k, n = st.get("epochs_finished", 0), st.get("epochs_planned", 0)
    what = {"training": "stopped (killed or still running)", "interrupted": "interrupted",
            "diverged": "stopped because training diverged", "failed": "stopped by an error"}.get(st["state"],
                                                                                                  st["state"])
    return f"{what} after epoch {k} of {n}" if k else f"{what} before its first epoch finished"


class UnfinishedRunWarning(TclNote):
    """A command used the last finished epoch of a run that did not finish."""


def weights_file(run_dir, which):
    """The weights file to use for `which` ('best', 'final' or a file name) in a run directory.

    A finished run (or a folder without state) gives best.npz / weights.npz as asked. An unfinished run gives the
    last finished epoch (checkpoint.npz) with an UnfinishedRunWarning saying so (the CLI prints it on stderr); one
    that never finished an epoch is refused."""
    names = {"final": "weights.npz", "best": "best.npz"}
    st = read_state(run_dir)
    if st is None or st["state"] == FINISHED:
        path = os.path.join(run_dir, names.get(which, which))
        return path if os.path.exists(path) else os.path.join(run_dir, names["final"])
    ckpt = os.path.join(run_dir, "checkpoint.npz")
    if st.get("epochs_finished", 0) < 1 or not os.path.exists(ckpt):
        raise ModelError(f"The run in '{run_dir}' is unfinished: it {describe(st)}, so it has no trained weights.",
                         "Continue it with `tcl finetune RECIPE --resume` (or start it again with --force).")
    warnings.warn(f"the run in '{run_dir}' is unfinished ({describe(st)}); using the weights of epoch "
             f"{st['epochs_finished']}, its last finished epoch. Finish it with `tcl finetune RECIPE --resume`.",
                  UnfinishedRunWarning, stacklevel=2)
    return ckpt
