"""`tcl finetune`: the training loop, from a recipe to a run directory.

recipe -> Session (data splits, model, plan, device; session.py) -> run directory (rundir.py) -> frozen-prefix feature
cache -> fit: epochs of forward/loss/backward/optimizer on the device, with callbacks around each epoch (divergence
guard, best epoch, checkpoint, metrics log, early stopping; callbacks.py) -> final evaluation report.
"""
import math
import os
import time

import numpy as np

from .callbacks import (BestEpoch, Checkpoint, DivergenceGuard, EarlyStopping, EpochLine, TrainingDiverged,
                        batch_mode_gap)
from .errors import TclError
from .rundir import RunDir, load_params_into
from .session import (PARAM_TRAINED, Session, choose_micro_batch, class_weight_vector, exclude_unreadable,  # noqa: F401
                      memory_budget, resolve_preprocess)


class NonFinite(Exception):
    """Raised inside a training step when the loss, the logits or the gradient norm is NaN or infinite."""

    def __init__(self, what, value):
        super().__init__(what)
        self.what = what
        self.value = value


class Interrupted(TclError):
    exit_code = 130


def lr_at(train, epoch):
    """Learning rate for a 0-based epoch under the recipe's schedule."""
    lr = train["lr"]
    sched = train["schedule"]
    warm = train["warmup_epochs"] if sched == "warmup" else train.get("warmup_epochs", 0)
    if warm and epoch < warm:
        return lr * (epoch + 1) / warm
    if sched == "step":
        return lr * (train["gamma"] ** (epoch // train["step_size"]))
    if sched == "cosine":
        t = (epoch - warm) / max(1, train["epochs"] - warm)
        return lr * 0.5 * (1 + math.cos(math.pi * t))
    return lr


class Optimizer:
    """Per-parameter optimizer state on the device; one `step` for all gradients."""

    def __init__(self, be, train):
        self.be = be
        self.kind = train["optimizer"]
        self.momentum = train["momentum"]
        self.weight_decay = train["weight_decay"]
        self.state = {}
        self.t = 0

    def step(self, params, grads, lr):
        """params, grads: {(node, key): backend tensor}."""
        be = self.be
        self.t += 1
        for k, g in grads.items():
            p = params[k]
            st = self.state.setdefault(k, {})
            wd = self.weight_decay if k[1] == "weight" else 0.0
            if self.kind in ("sgd", "momentum", "nesterov"):
                be.fn("sgd_step")(be, p, g, st, lr, momentum=0.0 if self.kind == "sgd" else self.momentum,
                                  nesterov=self.kind == "nesterov", weight_decay=wd)
            else:
                be.fn("adam_step")(be, p, g, st, lr, weight_decay=wd, decoupled=self.kind == "adamw", step=self.t)

    def state_arrays(self):
        out = {"__t": np.array(self.t)}
        for (node, key), st in self.state.items():
            for sk, v in st.items():
                if hasattr(v, "shape") or isinstance(v, np.ndarray):
                    out[f"{node}/{key}/{sk}"] = np.asarray(self.be.to_host(v))
                elif isinstance(v, (int, float)):
                    out[f"{node}/{key}/{sk}"] = np.array(v)
        return out

    def load_state(self, arrays):
        self.t = int(arrays.get("__t", 0))
        for name, v in arrays.items():
            if name == "__t":
                continue
            node, key, sk = name.rsplit("/", 2)
            self.state.setdefault((node, key), {})[sk] = self.be.asarray(v) if v.ndim else v.item()


def _bar(total, desc, quiet):
    """A progress bar on a terminal only: piped into a log file or a script (cron, termux-job-scheduler) it would write
    every redraw; the per-epoch lines carry the same numbers."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=True if quiet else None, leave=False, dynamic_ncols=True)


def compute_prefix_features(session, items, quiet=False):
    """Frozen-prefix outputs for items via the disk cache. Returns (features array (N, ...), ok mask, cache)."""
    from .cache import FeatureCache
    from .data import ImageLoader
    from .executor import Executor
    from .plan import graph_digest

    p, be = session.plan, session.be
    shape = p.suffix.inputs[p.cache_tensor]
    key = {"prefix": graph_digest(p.prefix), "tensor": p.cache_tensor, "pre": session.pre.to_dict()}
    cache = FeatureCache(key, shape, root=os.environ.get("TCL_FEATURE_CACHE"),
                         dtype=np.float16 if session.recipe["precision"] == "fp16" else np.float32)
    ex = Executor(p.prefix, be)
    inp = next(iter(p.prefix.inputs))
    bs = min(32, session.recipe["train"]["batch_size"])
    bad = []

    def compute(missing):
        loader = ImageLoader(missing, batch_size=bs, preprocess=session.pre, num_workers=2,
                             on_bad_image=lambda path, reason: bad.append((path, reason)))
        for x, _, paths in loader:
            out = ex.forward({inp: x})[p.cache_tensor]
            feats = be.to_host(out)
            be.release(out)
            yield paths, feats

    bar = _bar(len(items), "caching features", quiet)
    try:
        data, rows, ok = cache.features(items, compute, progress=bar.update)
    finally:
        bar.close()
    session.bad_images.extend(bad)
    return data, rows, ok, cache


class Trainer:
    def __init__(self, session):
        from .executor import Executor

        self.s = session
        self.be = session.be
        p = session.plan
        self.graph = p.suffix if p.use_cache else p.exec_graph
        self.input = next(iter(self.graph.inputs))
        self.output = self.graph.outputs[0]
        self.ex = Executor(self.graph, self.be, p.trainable, half_saved=session.recipe["precision"] == "fp16")
        self.opt = Optimizer(self.be, session.recipe["train"])
        self.micro_batch = session.micro_batch

    def params(self):
        return {(n.name, k): self.be.param(n, k) for n in self.graph.param_nodes() if n.name in self.s.plan.trainable
                for k in n.params if k in PARAM_TRAINED}

    def step(self, x, y, lr, step_id):
        """One optimizer step on a batch, as micro-batches with gradient accumulation when the batch does not fit
        the memory budget (same result as the full batch unless a BatchNorm trains, whose statistics are then
        per micro-batch)."""
        be, t = self.be, self.s.recipe["train"]
        n = len(y)
        mb = self.micro_batch or n
        cw = self.s.class_weights
        # Each micro-batch's mean loss is weighted by its share of the batch's total (class) weight.
        w_all = float(np.sum(cw[np.asarray(y)])) if cw is not None else float(n)
        total_loss, correct, grads = 0.0, 0, None
        for s0 in range(0, n, mb):
            xs, ys = x[s0:s0 + mb], np.asarray(y[s0:s0 + mb], np.int32)
            share = (float(np.sum(cw[ys])) if cw is not None else float(len(ys))) / w_all
            # Dropout masks are a function of (node seed, step, micro-batch): a resumed run draws the same masks.
            be.step = step_id * 1024 + s0 // mb
            out = self.ex.forward({self.input: xs}, training=True)[self.output]
            labels = be.asarray(ys)
            loss, glogits = be.fn("softmax_xent")(be, out, labels, label_smoothing=t["label_smoothing"],
                                                 class_weights=cw)
            logits = be.to_host(out)
            correct += int(np.sum(np.argmax(logits, axis=1) == ys))
            be.release(out)
            be.release(labels)
            # The logits are on the host anyway (accuracy): checking them costs nothing, and a non-finite logit can
            # hide behind a finite loss.
            bad = ("the training loss", loss) if not math.isfinite(loss) else \
                ("the logits", float(logits[~np.isfinite(logits)][0])) if not np.isfinite(logits).all() else None
            if bad:
                self.ex.end_step()
                be.release(glogits)
                for g in (grads or {}).values():
                    be.release(g)
                raise NonFinite(*bad)
            total_loss += loss * share
            if share != 1.0:
                be.fn("scale_inplace")(be, glogits, share)
            g = self.ex.backward({self.output: glogits})
            be.release(glogits)
            g = {k: v for k, v in g.items() if k[1] in PARAM_TRAINED}
            if grads is None:
                grads = g
            else:
                for k, v in g.items():
                    be.fn("add_inplace")(be, grads[k], v)
                    be.release(v)
        if t["clip_grad_norm"]:
            norm = math.sqrt(be.fn("grad_norm_sq")(be, list(grads.values())))
            if not math.isfinite(norm):
                for g in grads.values():
                    be.release(g)
                raise NonFinite("the gradient norm", norm)
            if norm > t["clip_grad_norm"]:
                for g in grads.values():
                    be.fn("scale_inplace")(be, g, t["clip_grad_norm"] / norm)
        self.opt.step(self.params(), grads, lr)
        for g in grads.values():
            be.release(g)
        return total_loss, correct

    def predict(self, x):
        out = self.ex.forward({self.input: x}, training=False)[self.output]
        logits = self.be.to_host(out).astype(np.float64)
        self.be.release(out)
        return logits


def softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class Source:
    """Batches of model input for one split: cached prefix features or decoded (optionally augmented) images."""

    def __init__(self, session, items, features=None, augment=False, shuffle=False):
        self.s = session
        self.items = items
        self.features = features  # (data, rows, ok) or None
        self.augment = augment
        self.shuffle = shuffle
        self.loader = None
        if features is None and items:
            from .data import ImageLoader

            self.loader = ImageLoader(items, batch_size=session.recipe["train"]["batch_size"], shuffle=shuffle,
                                      seed=session.recipe["train"]["seed"], preprocess=session.pre,
                                      augment=session.augment if augment else None,
                                      on_bad_image=lambda p, r: session.bad_images.append((p, r)))

    def __len__(self):
        if self.features is not None:
            return int(self.features[2].sum())
        return len(self.items)

    def batches(self, epoch, batch_size):
        if self.loader is not None:
            for x, y, paths in self.loader.epoch(epoch):
                yield x, y, paths
            return
        if self.features is None:
            return
        data, rows, ok = self.features
        idx = np.flatnonzero(ok)
        if self.shuffle:
            idx = idx[np.random.default_rng([self.s.recipe["train"]["seed"], epoch]).permutation(len(idx))]
        for s in range(0, len(idx), batch_size):
            b = idx[s:s + batch_size]
            yield (np.asarray(data[rows[b]], dtype=np.float32), np.array([self.items[i][1] for i in b], np.int32),
                   [self.items[i][0] for i in b])


def predict_source(trainer, source, batch_size):
    """Probabilities, labels and paths for every readable item of a source."""
    probs, labels, paths = [], [], []
    for x, y, p in source.batches(0, batch_size):
        probs.append(softmax(trainer.predict(x)))
        labels.append(y)
        paths.extend(p)
    if not probs:
        return np.zeros((0, len(trainer.s.classes))), np.zeros(0, np.int64), []
    return np.concatenate(probs), np.concatenate(labels).astype(np.int64), paths


def _cross_entropy(probs, y):
    if len(y) == 0:
        return float("nan")
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0))))


def _cached_sources(session, quiet, log, epochs_left):
    """{split: (features, rows, ok)} from the feature cache (empty when the plan does not cache), and cache info."""
    splits, plan = session.splits, session.plan
    if not plan.use_cache:
        return {}, None
    feats = {}
    all_items = splits["train"] + splits["val"] + splits["test"]
    data, rows, ok, cache = compute_prefix_features(session, all_items, quiet=quiet)
    off = 0
    for name in ("train", "val", "test"):
        n = len(splits[name])
        feats[name] = (data, rows[off:off + n], ok[off:off + n])
        off += n
    info = {"hits": cache.hits, "misses": cache.misses, "compute_seconds": round(cache.compute_seconds, 2),
            "seconds_per_image": cache.seconds_per_image, "dir": cache.dir,
            "seconds_saved_now": round(cache.seconds_saved(), 2),
            "seconds_saved_over_epochs": round((cache.seconds_per_image or 0) * len(all_items)
                                               * (max(1, epochs_left) + 1) - cache.compute_seconds, 1)}
    log(f"cache      {cache.hits} hits, {cache.misses} computed in {cache.compute_seconds:.1f} s; recomputing the "
        f"prefix every epoch would have cost about {info['seconds_saved_over_epochs']:.0f} s more")
    return feats, info


def _train_epoch(trainer, src, t, epoch, quiet):
    """One pass over the training split. Returns (mean loss, accuracy, images, seconds); raises NonFinite."""
    lr = lr_at(t, epoch)
    t0 = time.perf_counter()
    tot_loss, tot_correct, tot_n, step = 0.0, 0, 0, 0
    bar = _bar(len(src), f"epoch {epoch + 1}/{t['epochs']}", quiet)
    try:
        for x, y, _ in src.batches(epoch, t["batch_size"]):
            loss, correct = trainer.step(x, y, lr, epoch * 100003 + step)
            step += 1
            tot_loss += loss * len(y)
            tot_correct += correct
            tot_n += len(y)
            bar.update(len(y))
            bar.set_postfix(loss=f"{tot_loss / tot_n:.4f}", acc=f"{tot_correct / tot_n:.3f}")
    finally:
        bar.close()
    trainer.be.finish()
    return tot_loss / max(tot_n, 1), tot_correct / max(tot_n, 1), tot_n, time.perf_counter() - t0


class Fit:
    """What the loop and its callbacks share: the session, the trainer, the run directory, the Progress."""

    def __init__(self, session, trainer, run, progress):
        self.session, self.trainer, self.run, self.progress = session, trainer, run, progress
        self.t = session.recipe["train"]
        self.stop = False
        self.improved = False


def default_callbacks(recipe, quiet=True, log=print):
    """The loop's callbacks for a recipe: divergence guard, best epoch, checkpoint, the epoch line, early stopping."""
    es = recipe["train"]["early_stopping"]
    cbs = [DivergenceGuard(), BestEpoch((es or {}).get("metric", "val_accuracy")), Checkpoint()]
    if not quiet:
        cbs.append(EpochLine(log))
    if es:
        cbs.append(EarlyStopping(es["patience"], es["metric"], log))
    return cbs


def fit(f, src, callbacks, quiet=False):
    """The epochs from f.progress.start_epoch to train.epochs (or an early stop)."""
    t, p = f.t, f.progress
    has_val = len(src["val"]) > 0
    for epoch in range(p.start_epoch, t["epochs"]):
        try:
            loss, acc, n, dt = _train_epoch(f.trainer, src["train"], t, epoch, quiet)
        except NonFinite as e:
            from .callbacks import diverged

            raise diverged(f.run.path, t, epoch, f"{e.what} became {e.value}", p.history) from None
        f.session.be.sync_params_to_host(f.trainer.graph)
        rec = {"epoch": epoch + 1, "lr": lr_at(t, epoch), "train_loss": loss, "train_accuracy": acc,
               "seconds": round(dt, 3), "images_per_sec": round(n / dt, 1) if dt > 0 else None}
        for cb in callbacks:
            cb.on_epoch_trained(f, epoch, rec)
        if has_val:
            probs, yv, _ = predict_source(f.trainer, src["val"], t["batch_size"])
            rec["val_loss"] = _cross_entropy(probs, yv)
            rec["val_accuracy"] = float(np.mean(np.argmax(probs, 1) == yv)) if len(yv) else float("nan")
        p.history.append(rec)
        for cb in callbacks:
            cb.on_epoch_end(f, rec)
        if f.stop:
            break


def finetune(recipe, resume=False, dry_run=False, quiet=False, log=print, force=False, callbacks=None):
    """Run a recipe end to end. Returns a dict summary (also written to the run directory). `callbacks` replace the
    default ones (divergence guard, best epoch, checkpoint, epoch line, early stopping; see callbacks.py)."""
    t_start = time.perf_counter()
    session = Session(recipe, log=log)
    plan_text = session.describe()
    log(plan_text)
    if dry_run:
        return {"dry_run": True, "plan": plan_text}
    run = RunDir(recipe["output"])
    run.check_not_an_input(recipe, resume)
    with run.lock():
        progress = run.prepare(session, resume, force, log)
        try:
            run.state("training", progress, recipe["train"]["epochs"])
            cbs = default_callbacks(recipe, quiet, log) if callbacks is None else callbacks
            return _run(session, run, progress, cbs, quiet, log, t_start)
        except BaseException as e:
            # However the run ends early, state.json says so (a reader then uses the last finished epoch, or
            # refuses).
            state = ("interrupted" if isinstance(e, (KeyboardInterrupt, Interrupted)) else
                     "diverged" if isinstance(e, TrainingDiverged) else "failed")
            try:
                run.state(state, progress, recipe["train"]["epochs"], detail=str(e))
            except Exception:  # noqa: BLE001 - the original error matters more than a failed state write
                pass
            raise


def _run(session, run, progress, callbacks, quiet, log, t_start):
    from .report import compute_metrics, format_table, write_report

    recipe, plan, splits = session.recipe, session.plan, session.splits
    t = recipe["train"]
    run.write_start(session)
    feats, cache_info = _cached_sources(session, quiet, log, t["epochs"] - progress.start_epoch)
    trainer = Trainer(session)
    if progress.optimizer is not None:
        trainer.opt.load_state(progress.optimizer)
    src = {name: Source(session, splits[name], feats.get(name), augment=(name == "train"), shuffle=(name == "train"))
           for name in ("train", "val", "test")}
    bs = t["batch_size"]
    eval_split = "test" if len(src["test"]) else ("val" if len(src["val"]) else "train")
    if not progress.history:
        # Accuracy of the untrained head, so the report shows what fine-tuning changed.
        probs0, y0, _ = predict_source(trainer, src[eval_split], bs)
        if len(y0):
            progress.initial = float(np.mean(np.argmax(probs0, 1) == y0))
            log(f"before     {eval_split} accuracy {progress.initial:.4f} with the new head untrained")
    run.reset_metrics(progress.history)
    f = Fit(session, trainer, run, progress)
    try:
        fit(f, src, callbacks, quiet)
    except KeyboardInterrupt:
        raise Interrupted(f"Interrupted during epoch {progress.epochs_finished + 1}. The checkpoint of the last "
                          f"finished epoch is in {run.path}.", "Continue with `tcl finetune RECIPE --resume`.") from None
    finally:
        for so in src.values():
            if so.loader is not None:
                so.loader.close()
    history, best = progress.history, progress.best
    bn_gap = batch_mode_gap(f, src["train"])
    run.write_final(session)
    if best is None:
        # No validation split: the final weights are the best we know.
        from .rundir import trainable_arrays

        run.write_best(trainable_arrays(plan.graph, plan.trainable))
        eval_weights = "final"
    else:
        load_params_into(plan.graph, progress.best_params)
        session.be.forget_params()
        trainer = Trainer(session)
        eval_weights = f"best (epoch {best['epoch']}, {best['metric']} {best['value']:.4f})"
    t0 = time.perf_counter()
    probs, yt, paths = predict_source(trainer, src[eval_split], bs)
    dt = time.perf_counter() - t0
    metrics = compute_metrics(yt, np.argmax(probs, 1) if len(yt) else yt, probs, session.classes, paths=paths)
    meta = {"model": recipe["model"], "run_dir": os.path.abspath(run.path), "split": eval_split,
            "weights": eval_weights, "device": session.be.rt.info.name if hasattr(session.be, "rt") else "numpy",
            "images_per_sec": round(len(yt) / dt, 1) if dt > 0 else None, "epochs": len(history),
            "train_seconds": round(time.perf_counter() - t_start, 1), "cache": cache_info,
            "initial_accuracy": progress.initial, "batchnorm_gap": bn_gap,
            "bad_images": [{"path": p, "reason": r} for p, r in _dedup(session.bad_images)]}
    write_report(run.path, metrics, meta, history=history)
    run.finished(progress, t["epochs"])
    log(format_table(metrics))
    if progress.initial is not None:
        log(f"{eval_split} accuracy {progress.initial:.4f} before fine-tuning -> {metrics['accuracy']:.4f} after "
            f"({len(history)} epochs, {meta['train_seconds']} s)")
    log(f"run directory: {os.path.abspath(run.path)}")
    return {"run_dir": run.path, "metrics": metrics, "meta": meta, "history": history}


def _dedup(pairs):
    seen, out = set(), []
    for p, r in pairs:
        if p not in seen:
            seen.add(p)
            out.append((p, r))
    return out
