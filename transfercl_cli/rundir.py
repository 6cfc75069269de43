"""A run directory: its files, its state, its lock, the checkpoint commit and what --resume reads back.

Every file is written atomically (temp file, then rename). checkpoint.npz holds one finished epoch whole: the
trainable layers' parameters under their own 'layer/param' names (so it loads as a weights file, over frozen.npz),
the optimizer state, the trainable parameters of the best epoch and the bookkeeping. One file replaced by one rename
is the commit point: a crash or a full disk leaves the previous epoch's checkpoint, never the parameters of one epoch
with the optimizer state or history of another. The frozen layers never change, so frozen.npz holds them once for
the whole run (a phone keeps one copy of a ResNet-50's 100 MB, not four).
"""
import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field

import numpy as np

from .errors import DamagedFile, RecipeError, TclError
from .fsutil import load_json, load_npz, save_npz, write_json, write_text
from .runstate import FINISHED, STATE_FILE, write_state

RUN_FILES = ("checkpoint.json", "checkpoint.npz", "optimizer.npz", "best.npz", "weights.npz", "frozen.npz",
             "model.json", "metrics.jsonl", "report.json", "report.md", "confusion_matrix.png", "training_curves.png",
             STATE_FILE)
# Keys that may differ when resuming (a diverged run continues from its last good epoch with a lower lr, say);
# everything else must match the run's recipe, or the resumed run would not be the run the checkpoint belongs to.
RESUME_MAY_CHANGE = ("epochs", "lr", "schedule", "step_size", "gamma", "warmup_epochs", "clip_grad_norm",
                     "early_stopping")
OPT, BEST, META = "__optimizer__/", "__best__/", "__meta__"
DAMAGED_FIX = "The run directory is damaged: start the run again with --force (or restore the file)."


@dataclass
class Progress:
    """Where a run stands: what a checkpoint holds, and what the training loop carries from epoch to epoch."""

    start_epoch: int = 0
    history: list = field(default_factory=list)  # one record per finished epoch (metrics.jsonl's lines)
    best: dict = None  # {"epoch", "value", "metric"} of the best epoch by the validation metric
    initial: float = None  # the untrained head's accuracy
    optimizer: dict = None  # optimizer state arrays from a checkpoint
    best_params: dict = field(default_factory=dict)  # 'layer/param' -> the best epoch's trainable arrays

    @property
    def epochs_finished(self):
        return self.history[-1]["epoch"] if self.history else 0


def trainable_arrays(graph, trainable):
    """Copies of every parameter (BatchNorm statistics included) of the layers `trainable`."""
    return {f"{n.name}/{k}": v.copy() for n in graph.nodes if n.name in trainable for k, v in n.params.items()}


def load_params_into(graph, arrays):
    for n in graph.nodes:
        for k in n.params:
            key = f"{n.name}/{k}"
            if key in arrays:
                n.params[k] = arrays[key].astype(np.float32).reshape(n.params[k].shape)


def recipe_digest(recipe, may_change=("epochs",)):
    keep = {k: recipe[k] for k in ("model", "cut_after", "head", "freeze", "unfreeze", "data", "augment", "input",
                                   "precision")}
    # data.strict only decides whether unreadable images are an error; it changes nothing a checkpoint holds.
    keep["data"] = {k: v for k, v in keep["data"].items() if k != "strict"}
    keep["train"] = {k: v for k, v in recipe["train"].items() if k not in may_change}
    if keep["train"].get("batchnorm") == {"default": "batch"}:
        del keep["train"]["batchnorm"]  # the behaviour before the key existed: checkpoints from then still resume
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


class RunDir:
    def __init__(self, path):
        self.path = path

    def file(self, name):
        return os.path.join(self.path, name)

    # -- before any work ---------------------------------------------------------------------------------------
    def check_not_an_input(self, recipe, resume):
        """A run directory that is also the recipe's model or inside its data would be replaced (--force) or mixed
        with the images while it is read."""
        out = os.path.realpath(self.path)
        if out == os.path.realpath(recipe["model"]) and not resume:
            raise RecipeError(f"The recipe's output '{self.path}' is its model: starting a run there would replace "
                              "the model it starts from.",
                              "Write the new run elsewhere (`output:` or -o), or continue that run with --resume.")
        root = os.path.realpath(recipe["data"]["root"])
        if out == root or out.startswith(root + os.sep):
            raise RecipeError(f"The recipe's output '{self.path}' is inside its data folder '{root}': the run's "
                              "files would be mixed with the images.", "Write the run elsewhere (`output:` or -o).")

    @contextlib.contextmanager
    def lock(self):
        """One `tcl finetune` per run directory at a time (a cron job overlapping a manual run would interleave two
        runs' checkpoints). An advisory lock that the OS drops when the process dies, so a killed run never blocks
        the next; on systems without fcntl there is no lock."""
        os.makedirs(self.path, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            yield
            return
        with open(self.file(".lock"), "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.seek(0)
                who = f.read().strip()
                raise TclError(f"Another `tcl finetune` is writing the run directory '{self.path}'"
                               f"{f' (process {who})' if who else ''}.",
                               "Wait for it to finish, or choose another --output.") from None
            f.seek(0)
            f.truncate()
            f.write(str(os.getpid()))
            f.flush()
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def prepare(self, session, resume, force, log):
        """Check the folder and read what --resume continues from (into session.plan.graph). Returns a Progress."""
        if resume:
            return self._resume(session, log)
        if os.path.exists(self.file("checkpoint.json")) or os.path.exists(self.file("model.json")):
            if not force:
                raise TclError(f"The output directory '{self.path}' already holds a run.",
                               "Continue it with --resume, replace it with --force, or choose another --output.")
            log(f"note: replacing the run in '{self.path}' (--force)")
            for f in RUN_FILES:
                if os.path.exists(self.file(f)):
                    os.unlink(self.file(f))
        return Progress()

    def _resume(self, session, log):
        recipe = session.recipe
        if not os.path.exists(self.file("checkpoint.npz")):
            raise TclError(f"--resume: the run directory '{self.path}' has no checkpoint.",
                           "Start the run without --resume (or point --output at the run to continue).")
        meta, params, opt, best_params = self.read_checkpoint()
        if meta.get("recipe") != recipe_digest(recipe):
            if meta.get("recipe_core") != recipe_digest(recipe, RESUME_MAY_CHANGE):
                raise TclError(f"--resume: the recipe differs from the one the run in '{self.path}' was started with "
                               f"(only train.{', train.'.join(RESUME_MAY_CHANGE)} may change).",
                               "Use the same recipe, or a new --output.")
            log("note: resuming with changed training settings (learning rate, schedule, clipping or epochs)")
        # Folded copies were made from the original parameters; only trainable layers changed, and those are shared.
        load_params_into(session.plan.graph, params)
        if meta.get("best") and best_params and not self._best_matches(best_params):
            self.write_best(best_params)  # a crash came between the commit and best.npz
        return Progress(meta["epoch"] + 1, meta["history"], meta.get("best"), meta.get("initial_accuracy"), opt,
                        best_params)

    # -- files --------------------------------------------------------------------------------------------------
    def write_start(self, session):
        """The recipe as resolved and the class names (every start); on a new run also the structure and the frozen
        layers. weights.npz comes only when the run finishes, so an unfinished run never offers untrained weights
        as its result (state.json tells readers to use the last finished epoch instead)."""
        import yaml

        from .runfile import graph_to_json

        recipe, plan = session.recipe, session.plan
        write_text(self.file("recipe.resolved.yaml"),
                   yaml.safe_dump(json.loads(json.dumps(dict(recipe), default=str)), sort_keys=False))
        write_json(self.file("classes.json"), session.classes)
        if not os.path.exists(self.file("model.json")):
            write_json(self.file("model.json"), graph_to_json(plan.graph))
            save_npz(self.file("frozen.npz"), {k: v for k, v in plan.graph.params().items()
                                               if k.split("/", 1)[0] not in plan.trainable})

    def commit_epoch(self, session, optimizer, epoch, progress):
        """Commit the finished 0-based `epoch` (the caller has synced and checked the parameters); checkpoint.json
        is a readable copy of the bookkeeping, written after the commit."""
        meta = {"epoch": epoch, "history": progress.history, "best": progress.best,
                "initial_accuracy": progress.initial, "recipe": recipe_digest(session.recipe),
                "recipe_core": recipe_digest(session.recipe, RESUME_MAY_CHANGE)}
        arrays = trainable_arrays(session.plan.graph, session.plan.trainable)
        arrays.update({OPT + k: v for k, v in optimizer.state_arrays().items()})
        arrays.update({BEST + k: v for k, v in progress.best_params.items()})
        arrays[META] = np.frombuffer(json.dumps(meta).encode("utf-8"), np.uint8)
        save_npz(self.file("checkpoint.npz"), arrays)
        write_json(self.file("checkpoint.json"), meta)

    def read_checkpoint(self, fix=DAMAGED_FIX):
        """(meta, parameters, optimizer state, best trainable parameters) of the checkpoint. Checkpoints of earlier
        versions (bookkeeping in checkpoint.json, optimizer state in optimizer.npz) are read too."""
        arrays = load_npz(self.file("checkpoint.npz"), "checkpoint", fix)
        if META in arrays:
            try:
                meta = json.loads(arrays.pop(META).tobytes().decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                meta = None
        else:
            meta = load_json(self.file("checkpoint.json"), "checkpoint", fix)
            arrays.update({OPT + k: v for k, v in load_npz(self.file("optimizer.npz"), "optimizer state",
                                                            fix).items()})
        if not (isinstance(meta, dict) and isinstance(meta.get("epoch"), int) and isinstance(meta.get("history"), list)):
            raise DamagedFile(f"The checkpoint in '{self.path}' is damaged or not a file tcl wrote (no epoch record).",
                              fix)

        def part(prefix):
            return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}

        params = {k: v for k, v in arrays.items() if not k.startswith((OPT, BEST))}
        return meta, params, part(OPT), part(BEST)

    def write_best(self, best_params):
        """best.npz: the best epoch's trainable parameters (the frozen ones are in frozen.npz)."""
        save_npz(self.file("best.npz"), best_params)

    def _best_matches(self, best_params):
        try:
            have = load_npz(self.file("best.npz"))
        except (OSError, TclError):
            return False
        return all(k in have and np.array_equal(have[k], v) for k, v in best_params.items())

    def reset_metrics(self, history):
        """metrics.jsonl holds exactly the checkpoint's epochs (an epoch interrupted after its line is redone)."""
        write_text(self.file("metrics.jsonl"), "".join(json.dumps(h) + "\n" for h in history))

    def append_metrics(self, rec):
        with open(self.file("metrics.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")

    def write_final(self, session):
        save_npz(self.file("weights.npz"), trainable_arrays(session.plan.graph, session.plan.trainable))

    def state(self, state, progress, epochs_planned, detail=None):
        write_state(self.path, state, progress.epochs_finished, epochs_planned, detail)

    def finished(self, progress, epochs_planned):
        self.state(FINISHED, progress, epochs_planned)
