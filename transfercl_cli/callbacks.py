"""What the training loop does around each epoch, as callbacks (Keras's `fit(callbacks=[...])` shape): each small
and testable alone. The loop (train.fit) calls, in list order,

- `on_epoch_trained(fit, epoch, rec)` after the epoch's steps, parameters synced to the host, before validation:
  the divergence guard stops the run here, before anything of the epoch is written;
- `on_epoch_end(fit, rec)` after validation, with `rec` appended to `fit.progress.history`: best-epoch tracking,
  the checkpoint commit, the metrics log, the per-epoch line, early stopping (sets `fit.stop`).

`fit` carries the session, the trainer, the run directory and the Progress (history, best, best parameters).
"""
import math
import warnings

import numpy as np

from .errors import TclError, TclNote

# A training loss this many times the first epoch's is a runaway (the loss is unclamped: lse - z_y).
RUNAWAY_FACTOR = 100.0
BN_GAP_POINTS = 15.0


class TrainingDiverged(TclError):
    pass


class TrainingNote(TclNote):
    """Something about the training run the user should know (printed as a note)."""


class Callback:
    def on_epoch_trained(self, fit, epoch, rec):
        pass

    def on_epoch_end(self, fit, rec):
        pass


# -- divergence ---------------------------------------------------------------------------------------------------
def nonfinite_params(graph, names):
    """'layer/param' of every parameter (BatchNorm statistics included) of the layers `names` holding NaN/Inf."""
    return [f"{n.name}/{k}" for n in graph.nodes if n.name in names for k, v in n.params.items()
            if not np.isfinite(v).all()]


def runaway_loss(loss, history, num_classes):
    """True when an epoch's training loss is orders of magnitude above the run's first epoch (a learning rate that
    sends the weights off without any NaN yet). The floor keeps a near-zero first loss from flagging noise."""
    if not history:
        return False
    ref = max(history[0]["train_loss"], 0.1 * math.log(max(num_classes, 2)))
    return loss > RUNAWAY_FACTOR * ref


def _lr_cause(t, epoch):
    from .train import lr_at

    lr = lr_at(t, epoch)
    if lr > t["lr"] * (1 + 1e-9):
        return (f"the learning rate: the '{t['schedule']}' schedule raised it to {lr:.3g} in this epoch (train.lr is "
                f"{t['lr']:g}{', train.gamma ' + format(t['gamma'], 'g') if t['schedule'] == 'step' else ''})",
                "Fix the schedule (train.gamma below 1 lowers the rate) or lower train.lr")
    return f"the learning rate (train.lr {lr:.3g} in this epoch)", "Lower train.lr (e.g. by 10x)"


def diverged(run_dir, t, epoch, what, history):
    """The one-paragraph error for a run that diverged in the 0-based `epoch`."""
    cause, fix = _lr_cause(t, epoch)
    first = f" (the first epoch's training loss was {history[0]['train_loss']:.4g})" if history else ""
    kept = (f"the checkpoint of epoch {history[-1]['epoch']}, the last good one, is kept in {run_dir}"
            if history else f"no epoch had finished, so {run_dir} holds no trained weights")
    return TrainingDiverged(
        f"Training diverged in epoch {epoch + 1}: {what}{first}. The likely cause is {cause}. Nothing non-finite "
        f"was written: {kept}.",
        f"{fix}, or set train.clip_grad_norm (e.g. 1.0), then continue from the last good epoch with `tcl finetune "
        "RECIPE --resume` (the learning rate and schedule may change on resume), or start over with --force.")


class DivergenceGuard(Callback):
    """Stops the run (TrainingDiverged, exit 2) when an epoch left a NaN/Inf in a trainable parameter or a BatchNorm
    statistic, or its loss ran away; the per-step checks (loss, logits, gradient norm) are in Trainer.step. Runs
    before anything of the epoch is written, so no checkpoint or best.npz ever holds a non-finite value."""

    def on_epoch_trained(self, fit, epoch, rec):
        bad = nonfinite_params(fit.trainer.graph, fit.session.plan.trainable)
        if bad:
            raise diverged(fit.run.path, fit.t, epoch, f"the parameters {', '.join(bad[:4])} became non-finite",
                           fit.progress.history)
        if runaway_loss(rec["train_loss"], fit.progress.history, len(fit.session.classes)):
            raise diverged(fit.run.path, fit.t, epoch, f"the training loss rose to {rec['train_loss']:.4g}",
                           fit.progress.history)


# -- bookkeeping ----------------------------------------------------------------------------------------------------
class BestEpoch(Callback):
    """Tracks the best epoch by the validation metric (val_accuracy up, or val_loss down) and keeps its trainable
    parameters; `fit.improved` says whether this epoch is the new best."""

    def __init__(self, metric):
        self.metric = metric

    def on_epoch_end(self, fit, rec):
        from .rundir import trainable_arrays

        p = fit.progress
        fit.improved = False
        if self.metric not in rec:
            return
        v = rec[self.metric]
        if p.best is None or (v > p.best["value"] if self.metric == "val_accuracy" else v < p.best["value"]):
            p.best = {"epoch": rec["epoch"], "value": v, "metric": self.metric}
            p.best_params = trainable_arrays(fit.session.plan.graph, fit.session.plan.trainable)
            fit.improved = True


class Checkpoint(Callback):
    """The commit point (checkpoint.npz), then what derives from it: best.npz, the metrics log, the state."""

    def on_epoch_end(self, fit, rec):
        run, p = fit.run, fit.progress
        run.commit_epoch(fit.session, fit.trainer.opt, rec["epoch"] - 1, p)
        if getattr(fit, "improved", False):
            run.write_best(p.best_params)
        run.append_metrics(rec)
        run.state("training", p, fit.t["epochs"])


class EpochLine(Callback):
    """One line per epoch for the log (the plan's `log`), as the README shows."""

    def __init__(self, log):
        self.log = log

    def on_epoch_end(self, fit, rec):
        msg = f"epoch {rec['epoch']:>3}/{fit.t['epochs']}  loss {rec['train_loss']:.4f}  acc {rec['train_accuracy']:.4f}"
        if "val_loss" in rec:
            msg += f"  val_loss {rec['val_loss']:.4f}  val_acc {rec['val_accuracy']:.4f}"
        self.log(msg + f"  {rec['images_per_sec']} img/s")


class EarlyStopping(Callback):
    """Stops after `patience` epochs without a better validation metric (counted from the best epoch, so a resumed
    run keeps counting where it was)."""

    def __init__(self, patience, metric, log):
        self.patience, self.metric, self.log = patience, metric, log

    def on_epoch_end(self, fit, rec):
        best = fit.progress.best
        if best and rec["epoch"] - best["epoch"] >= self.patience:
            self.log(f"early stopping: no {self.metric} improvement for {self.patience} epochs")
            fit.stop = True


# -- after training -------------------------------------------------------------------------------------------------
def batch_mode_gap(fit, train_src):
    """With a BatchNorm training in batch mode, the accuracy the last epoch reported (batch statistics) and the
    accuracy of the same training images in inference mode (the moving statistics a deployed model uses) can part:
    the moving statistics lag the changed weights. Measure both and warn past BN_GAP_POINTS points. None when no
    BatchNorm trains in batch mode (nothing to compare: training and inference normalise alike)."""
    from .train import predict_source

    plan, history = fit.session.plan, fit.progress.history
    if not history or not any(n.op == "batchnorm" and n.name in plan.trainable and n.attrs.get("bn_mode") == "batch"
                              for n in plan.graph.nodes):
        return None
    probs, y, _ = predict_source(fit.trainer, train_src, fit.t["batch_size"])
    if not len(y):
        return None
    infer = float(np.mean(np.argmax(probs, 1) == y))
    reported = history[-1]["train_accuracy"]
    gap = {"train_accuracy": reported, "train_accuracy_inference_mode": infer,
           "points": round(100 * (reported - infer), 2)}
    if gap["points"] > BN_GAP_POINTS:
        warnings.warn(f"training accuracy {reported:.4f} (BatchNorm in batch mode) but {infer:.4f} on the same images "
                      "in inference mode, as the model will be used: the BatchNorm's moving statistics lag the "
                      "trained weights. Set train.batchnorm: inference (the pretrained statistics stay, gamma/beta "
                      "train), or train more epochs.", TrainingNote, stacklevel=2)
    return gap
