"""`tcl finetune`: the training loop, from a recipe to a run directory.

recipe -> data splits -> plan (cut, head, freeze, fold, cache point) -> frozen-prefix feature cache -> epochs of
forward/loss/backward/optimizer on the device -> checkpoints, metrics.jsonl -> final evaluation report.
"""
import contextlib
import json
import math
import os
import time
import warnings

import numpy as np

from .errors import DataError, RecipeError, TclError, TclNote
from .fsutil import load_json, load_npz, save_npz, write_json, write_text
from .runstate import FINISHED, STATE_FILE, write_state

RUN_FILES = ("checkpoint.json", "checkpoint.npz", "optimizer.npz", "best.npz", "weights.npz", "frozen.npz", "model.json",
             "metrics.jsonl", "report.json", "report.md", "confusion_matrix.png", "training_curves.png", STATE_FILE)
PARAM_TRAINED = ("weight", "bias", "gamma", "beta", "scale", "offset")  # BN mean/var are statistics, not trained
# Keys that may differ when resuming (a diverged run continues from its last good epoch with a lower lr, say);
# everything else must match the run's recipe, or the resumed run would not be the run the checkpoint belongs to.
RESUME_MAY_CHANGE = ("epochs", "lr", "schedule", "step_size", "gamma", "warmup_epochs", "clip_grad_norm",
                     "early_stopping")
# A training loss this many times the first epoch's is a runaway (the loss is unclamped: lse - z_y).
RUNAWAY_FACTOR = 100.0


class TrainingDiverged(TclError):
    pass


class NonFinite(Exception):
    """Raised inside a training step when the loss, the logits or the gradient norm is NaN or infinite."""

    def __init__(self, what, value):
        super().__init__(what)
        self.what = what
        self.value = value


class Interrupted(TclError):
    exit_code = 130


def resolve_preprocess(recipe_input, graph):
    """Preprocessing from the recipe's `input`, else what the model says, else the default [-1, 1] scaling."""
    from .data import Preprocess

    hint = dict(graph.meta.get("preprocess") or {})
    d = {"resize": recipe_input.get("resize") or hint.get("resize") or "shorter_crop",
         "channel_order": recipe_input.get("channel_order") or hint.get("channel_order") or "RGB"}
    size = recipe_input.get("size") or hint.get("size")
    if not size:
        shp = next(iter(graph.inputs.values()))
        size = [shp[0], shp[1]] if len(shp) == 3 and shp[0] and shp[1] else [224, 224]
    d["size"] = list(size)
    if recipe_input.get("mean") is not None or recipe_input.get("std") is not None:
        if recipe_input.get("mean") is None or recipe_input.get("std") is None:
            raise RecipeError("Recipe key 'input': give both mean and std, or neither.",
                              "For ImageNet-style models: mean [0.485, 0.456, 0.406], std [0.229, 0.224, 0.225].")
        d["mean"], d["std"] = recipe_input["mean"], recipe_input["std"]
    elif recipe_input.get("scale") is not None or recipe_input.get("offset") is not None:
        d["scale"] = recipe_input.get("scale") if recipe_input.get("scale") is not None else 1.0
        d["offset"] = recipe_input.get("offset") if recipe_input.get("offset") is not None else 0.0
    elif hint.get("mean") is not None:
        d["mean"], d["std"] = hint["mean"], hint["std"]
    elif hint.get("scale") is not None:
        d["scale"], d["offset"] = hint["scale"], hint.get("offset", 0.0)
    else:
        d["scale"], d["offset"] = 1.0 / 127.5, -1.0
    for k in ("scale", "offset", "mean", "std"):
        if isinstance(d.get(k), list) and len(d[k]) == 1:
            d[k] = d[k][0]
    return Preprocess.from_dict(d)


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


def memory_budget(max_memory_mb, be):
    """Bytes a training step may use: the recipe's train.max_memory_mb, else a safe share of the device's global
    memory and of the host's free RAM (PoCL's device memory is host memory)."""
    if max_memory_mb:
        return int(max_memory_mb * 2**20)
    from .doctor import host_free_memory

    free = host_free_memory() or 2**31
    budget = int(0.5 * free)
    if hasattr(be, "rt"):
        budget = min(budget, int(0.8 * be.rt.info.global_mem), int(be.rt.info.global_mem))
    return budget


def choose_micro_batch(plan, batch, budget):
    """None when the whole batch fits the budget, else the largest micro-batch that does; fails early when even
    one image does not fit."""
    from .plan import estimate_memory

    if estimate_memory(plan, batch)["total"] <= budget:
        return None
    need1 = estimate_memory(plan, 1)["total"]
    if need1 > budget:
        raise TclError(
            f"A training step needs about {need1 / 2**20:.0f} MiB even with one image per micro-batch, but the "
            f"memory budget is {budget / 2**20:.0f} MiB.",
            "Freeze more layers (a later `unfreeze`), cut earlier, use a smaller input.size, or raise "
            "train.max_memory_mb if the device really has more memory.")
    lo, hi = 1, batch
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if estimate_memory(plan, mid)["total"] <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def class_weight_vector(spec, classes, train_items):
    if spec is None:
        return None
    k = len(classes)
    if spec == "auto":
        counts = np.bincount([y for _, y in train_items], minlength=k).astype(np.float64)
        counts[counts == 0] = 1
        return (counts.sum() / (k * counts)).astype(np.float32)
    w = np.ones(k, np.float32)
    for name, v in spec.items():
        if name not in classes:
            from .errors import closest

            hint = closest(name, classes)
            raise RecipeError(f"Recipe key 'train.class_weights': there is no class '{name}'."
                              + (f" Did you mean '{hint}'?" if hint else ""), f"The classes are: {', '.join(classes)}.")
        w[classes.index(name)] = v
    return w


def exclude_unreadable(splits, strict=False):
    """Find the images of every split that do not decode, drop them from the splits (so the plan's counts are what
    trains) and warn once with the count and the first paths; with data.strict, refuse instead. Returns
    [(path, reason)]. The splits are computed before the exclusion, so a file going bad moves no other file."""
    from .data import BadImageWarning, find_unreadable

    items = [p for name in ("train", "val", "test") for p, _ in splits[name]]
    bad = find_unreadable(items)
    if not bad:
        return []
    shown = "; ".join(f"{p} ({r})" for p, r in bad[:3]) + ("; ..." if len(bad) > 3 else "")
    if strict:
        raise DataError(f"{len(bad)} of the dataset's {len(items)} images cannot be read (data.strict is on): {shown}.",
                        "Delete or re-export those files, or set data.strict: false to skip them with a warning.")
    warnings.warn(f"{len(bad)} unreadable image(s) skipped, not counted in the splits: {shown}. Set data.strict: "
                  "true to make this an error.", BadImageWarning, stacklevel=2)
    drop = {p for p, _ in bad}
    for name in ("train", "val", "test"):
        splits.splits[name] = [(p, y) for p, y in splits[name] if p not in drop]
    return bad


class Session:
    """Everything a run needs, resolved before any work starts (so every input error comes first)."""

    def __init__(self, recipe, log=print):
        from .backends import make_backend
        from .data import Augment, recipe_splits
        from .plan import build_plan
        from .runfile import load_any_model

        self.recipe = recipe
        self.log = log
        d = recipe["data"]
        self.splits = recipe_splits(d)
        self.classes = list(self.splits.classes)
        self.bad_images = exclude_unreadable(self.splits, strict=d.get("strict", False))
        if recipe["train"]["early_stopping"] and not self.splits["val"]:
            raise RecipeError("Recipe key 'train.early_stopping' needs a validation split, and this dataset has none.",
                              "Set data.val (e.g. `val: 0.1`), add a val/ folder next to train/, or remove "
                              "train.early_stopping.")
        if not self.splits["train"]:
            raise DataError(f"The dataset '{d['root']}' has no training images after the split.",
                            "Add images, or lower data.val and data.test.")
        self.model_graph = load_any_model(recipe["model"], config=recipe["model_config"],
                                          input_size=recipe["input"]["size"])
        self.pre = resolve_preprocess(recipe["input"], self.model_graph)
        self.augment = Augment.from_dict(recipe["augment"])
        self.plan = build_plan(self.model_graph, recipe, self.classes)
        # Layers changed by this run and by earlier runs this model came from (export keeps only untouched ones).
        before = self.model_graph.meta
        self.plan.graph.meta.update(classes=self.classes, preprocess=self.pre.to_dict(),
                                    trainable=sorted(self.plan.trainable | set(before.get("trainable") or [])),
                                    new_layers=sorted(set(self.plan.new) | set(before.get("new_layers") or [])))
        self.class_weights = class_weight_vector(recipe["train"]["class_weights"], self.classes, self.splits["train"])
        self.be = make_backend(recipe["device"])
        self.budget = memory_budget(recipe["train"]["max_memory_mb"], self.be)
        self.micro_batch = choose_micro_batch(self.plan, recipe["train"]["batch_size"], self.budget)

    def describe(self):
        """The resolved plan as text (for --dry-run and the top of the log)."""
        p, r = self.plan, self.recipe
        lines = [f"model      {r['model']} ({len(self.model_graph.nodes)} layers, "
                 f"{self.model_graph.num_params():,} parameters)"]
        counts = self.splits.counts()
        lines.append(f"data       {r['data']['root']}: {len(self.classes)} classes ({', '.join(self.classes[:10])}"
                     f"{', ...' if len(self.classes) > 10 else ''}); " + ", ".join(
                         f"{s} {sum(c)}" for s, c in counts.items()))
        lines.append(f"input      {self.pre.to_dict()}")
        lines.append(f"cut        after {r['cut_after'] or '(no cut)'}: {len(p.cut)} layers dropped"
                     + (f" ({', '.join(p.cut[:6])}{', ...' if len(p.cut) > 6 else ''})" if p.cut else ""))
        lines.append(f"head       {', '.join(p.new)}")
        tr = [n.name for n in p.graph.nodes if n.name in p.trainable]
        ntrain = sum(v.size for n in p.graph.nodes if n.name in p.trainable for k, v in n.params.items()
                     if k in PARAM_TRAINED)
        lines.append(f"trainable  {len(tr)} layers, {ntrain:,} parameters: {', '.join(tr[:12])}"
                     f"{', ...' if len(tr) > 12 else ''}")
        from .plan import batchnorm_summary

        bns = batchnorm_summary(p)
        if bns:
            lines.append(f"batchnorm  training: {', '.join(bns[:6])}{', ...' if len(bns) > 6 else ''} (inference "
                         "mode: moving statistics used and kept, gamma/beta train; batch mode: the batch's "
                         "statistics; train.batchnorm)")
        lines.append(f"frozen     {len(p.frozen)} layers with parameters (BatchNorm in inference mode; "
                     f"{sum(1 for n in p.exec_graph.nodes if n.attrs.get('folded'))} layers carry the "
                     "BatchNorm/activation/padding/pool after them)")
        if r["precision"] == "fp16":
            lines.append("precision  fp16: cached features and the activations kept for the backward pass are stored "
                         "as float16 (half their memory); arithmetic stays float32")
        if p.use_cache:
            lines.append(f"cache      on: the frozen prefix's output '{p.cache_tensor}' "
                         f"{tuple(p.suffix.inputs[p.cache_tensor])} is computed once per image and reused")
        else:
            lines.append(f"cache      off: {p.cache_reason}")
        t = r["train"]
        lines.append(f"train      {t['epochs']} epochs, batch {t['batch_size']}, {t['optimizer']} lr {t['lr']} "
                     f"({t['schedule']}), weight decay {t['weight_decay']}, label smoothing {t['label_smoothing']}, "
                     f"seed {t['seed']}")
        mem = p.memory
        lines.append(f"memory     about {mem['total'] / 2**20:.0f} MiB on the device for a training step "
                     f"(parameters {mem['params'] / 2**20:.0f}, optimizer+gradients "
                     f"{mem['optimizer_and_grads'] / 2**20:.0f}, activations {mem['activations'] / 2**20:.0f})")
        be = self.be
        dev = be.rt.info.name if hasattr(be, "rt") else "numpy reference (slow fallback)"
        if self.micro_batch:
            lines.append(f"micro      batch {r['train']['batch_size']} does not fit the {self.budget / 2**20:.0f} MiB "
                         f"budget: micro-batches of {self.micro_batch} with gradient accumulation")
        lines.append(f"device     {dev}")
        lines.append(f"output     {r['output']}")
        return "\n".join(lines)


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
        return {(n.name, k): self.be.param(n, k) for n in self.graph.nodes if n.name in self.s.plan.trainable
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


# checkpoint.npz holds one finished epoch whole: the trainable layers' parameters under their own 'layer/param' names
# (so it loads as a weights file, over frozen.npz), the optimizer state, the trainable parameters of the best epoch
# and the bookkeeping. One file replaced by one rename is the commit point: a crash or a full disk leaves the
# previous epoch's checkpoint, never the parameters of one epoch with the optimizer state or history of another.
# The frozen layers never change, so frozen.npz holds them once for the whole run (a phone keeps one copy of a
# ResNet-50's 100 MB, not four).
OPT, BEST, META = "__optimizer__/", "__best__/", "__meta__"


def _save_checkpoint(run_dir, trainer, epoch, history, best, initial, best_params):
    """Commit the finished 0-based `epoch` (the caller has synced and checked the parameters); checkpoint.json is a
    readable copy of the bookkeeping, written after the commit."""
    s = trainer.s
    meta = {"epoch": epoch, "history": history, "best": best, "initial_accuracy": initial,
            "recipe": _recipe_digest(s.recipe), "recipe_core": _recipe_digest(s.recipe, RESUME_MAY_CHANGE)}
    arrays = _trainable_arrays(s.plan.graph, s.plan.trainable)
    arrays.update({OPT + k: v for k, v in trainer.opt.state_arrays().items()})
    arrays.update({BEST + k: v for k, v in best_params.items()})
    arrays[META] = np.frombuffer(json.dumps(meta).encode("utf-8"), np.uint8)
    save_npz(os.path.join(run_dir, "checkpoint.npz"), arrays)
    write_json(os.path.join(run_dir, "checkpoint.json"), meta)


def _read_checkpoint(run_dir, fix):
    """(meta, parameters, optimizer state, best trainable parameters) of a run's checkpoint. Checkpoints of earlier
    versions (bookkeeping in checkpoint.json, optimizer state in optimizer.npz) are read too."""
    arrays = load_npz(os.path.join(run_dir, "checkpoint.npz"), "checkpoint", fix)
    if META in arrays:
        try:
            meta = json.loads(arrays.pop(META).tobytes().decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            meta = None
    else:
        meta = load_json(os.path.join(run_dir, "checkpoint.json"), "checkpoint", fix)
        arrays.update({OPT + k: v for k, v in load_npz(os.path.join(run_dir, "optimizer.npz"),
                                                        "optimizer state", fix).items()})
    if not isinstance(meta, dict) or not isinstance(meta.get("epoch"), int) or not isinstance(meta.get("history"),
                                                                                             list):
        from .errors import DamagedFile

        raise DamagedFile(f"The checkpoint in '{run_dir}' is damaged or not a file tcl wrote (no epoch record).",
                          fix)
    part = lambda prefix: {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}  # noqa: E731
    params = {k: v for k, v in arrays.items() if not k.startswith(("__optimizer__/", "__best__/"))}
    return meta, params, part(OPT), part(BEST)


def _write_best(run_dir, graph, best_params):
    """best.npz: the best epoch's trainable parameters (the frozen ones are in frozen.npz)."""
    save_npz(os.path.join(run_dir, "best.npz"), best_params)


def _best_matches(run_dir, best_params):
    path = os.path.join(run_dir, "best.npz")
    try:
        have = load_npz(path)
    except (OSError, TclError):
        return False
    return all(k in have and np.array_equal(have[k], v) for k, v in best_params.items())


def _trainable_arrays(graph, trainable):
    return {f"{n.name}/{k}": v.copy() for n in graph.nodes if n.name in trainable for k, v in n.params.items()}


def _recipe_digest(recipe, may_change=("epochs",)):
    import hashlib

    keep = {k: recipe[k] for k in ("model", "cut_after", "head", "freeze", "unfreeze", "data", "augment", "input",
                                   "precision")}
    # data.strict only decides whether unreadable images are an error; it changes nothing a checkpoint holds.
    keep["data"] = {k: v for k, v in keep["data"].items() if k != "strict"}
    keep["train"] = {k: v for k, v in recipe["train"].items() if k not in may_change}
    if keep["train"].get("batchnorm") == {"default": "batch"}:
        del keep["train"]["batchnorm"]  # the behaviour before the key existed: checkpoints from then still resume
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _load_params_into(graph, arrays):
    for n in graph.nodes:
        for k in n.params:
            key = f"{n.name}/{k}"
            if key in arrays:
                n.params[k] = arrays[key].astype(np.float32).reshape(n.params[k].shape)


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


def _prepare_run_dir(session, run_dir, resume, force, log):
    """Check the output folder and load what --resume continues from. Returns (start_epoch, history, best, initial,
    optimizer arrays or None, best trainable parameters)."""
    recipe = session.recipe
    ckpt_json = os.path.join(run_dir, "checkpoint.json")
    if resume:
        if not os.path.exists(os.path.join(run_dir, "checkpoint.npz")):
            raise TclError(f"--resume: the run directory '{run_dir}' has no checkpoint.",
                           "Start the run without --resume (or point --output at the run to continue).")
        fix = "The run directory is damaged: start the run again with --force (or restore the file)."
        ck, params, opt, best_params = _read_checkpoint(run_dir, fix)
        if ck.get("recipe") != _recipe_digest(recipe):
            if ck.get("recipe_core") != _recipe_digest(recipe, RESUME_MAY_CHANGE):
                raise TclError(f"--resume: the recipe differs from the one the run in '{run_dir}' was started with "
                               f"(only train.{', train.'.join(RESUME_MAY_CHANGE)} may change).",
                               "Use the same recipe, or a new --output.")
            log("note: resuming with changed training settings (learning rate, schedule, clipping or epochs)")
        _load_params_into(session.plan.graph, params)
        # Folded copies were made from the original parameters; only trainable layers changed, and those are shared.
        if ck.get("best") and best_params and not _best_matches(run_dir, best_params):
            _write_best(run_dir, session.plan.graph, best_params)  # a crash came between the commit and best.npz
        return ck["epoch"] + 1, ck["history"], ck.get("best"), ck.get("initial_accuracy"), opt, best_params
    if os.path.exists(ckpt_json) or os.path.exists(os.path.join(run_dir, "model.json")):
        if not force:
            raise TclError(f"The output directory '{run_dir}' already holds a run.",
                           "Continue it with --resume, replace it with --force, or choose another --output.")
        log(f"note: replacing the run in '{run_dir}' (--force)")
        for f in RUN_FILES:
            if os.path.exists(os.path.join(run_dir, f)):
                os.unlink(os.path.join(run_dir, f))
    return 0, [], None, None, None, {}


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


BN_GAP_POINTS = 15.0


def batch_mode_gap(session, trainer, train_src, history, bs):
    """With a BatchNorm training in batch mode, the accuracy the last epoch reported (batch statistics) and the
    accuracy of the same training images in inference mode (the moving statistics a deployed model uses) can part:
    the moving statistics lag the changed weights. Measure both and warn past BN_GAP_POINTS points. None when no
    BatchNorm trains in batch mode (nothing to compare: training and inference normalise alike)."""
    plan = session.plan
    if not history or not any(n.op == "batchnorm" and n.name in plan.trainable and n.attrs.get("bn_mode") == "batch"
                              for n in plan.graph.nodes):
        return None
    probs, y, _ = predict_source(trainer, train_src, bs)
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


class TrainingNote(TclNote):
    """Something about the training run the user should know (printed as a note)."""


def _epochs_finished(history):
    return history[-1]["epoch"] if history else 0


def finetune(recipe, resume=False, dry_run=False, quiet=False, log=print, force=False):
    """Run a recipe end to end. Returns a dict summary (also written to the run directory)."""
    t_start = time.perf_counter()
    session = Session(recipe, log=log)
    plan_text = session.describe()
    log(plan_text)
    if dry_run:
        return {"dry_run": True, "plan": plan_text}
    run_dir = recipe["output"]
    _check_output_is_not_an_input(recipe, resume)
    os.makedirs(run_dir, exist_ok=True)
    with run_dir_lock(run_dir):
        start_epoch, history, best, initial, opt_state, best_params = _prepare_run_dir(session, run_dir, resume,
                                                                                       force, log)
        try:
            write_state(run_dir, "training", _epochs_finished(history), recipe["train"]["epochs"])
            return _run(session, run_dir, (start_epoch, history, best, initial, opt_state, best_params), quiet, log,
                        t_start)
        except BaseException as e:
            # However the run ends early, state.json says so (a reader then uses the last finished epoch, or
            # refuses).
            state = ("interrupted" if isinstance(e, (KeyboardInterrupt, Interrupted)) else
                     "diverged" if isinstance(e, TrainingDiverged) else "failed")
            with contextlib.suppress(Exception):  # the original error matters more than a failed state write
                write_state(run_dir, state, _epochs_finished(history), recipe["train"]["epochs"], detail=str(e))
            raise


def _check_output_is_not_an_input(recipe, resume):
    """A run directory that is also the recipe's model or inside its data would be replaced (--force) or mixed
    with the images while it is read."""
    out = os.path.realpath(recipe["output"])
    model = os.path.realpath(recipe["model"])
    if out == model and not resume:
        raise RecipeError(f"The recipe's output '{recipe['output']}' is its model: starting a run there would "
                          "replace the model it starts from.",
                          "Write the new run elsewhere (`output:` or -o), or continue that run with --resume.")
    root = os.path.realpath(recipe["data"]["root"])
    if out == root or out.startswith(root + os.sep):
        raise RecipeError(f"The recipe's output '{recipe['output']}' is inside its data folder '{root}': the run's "
                          "files would be mixed with the images.", "Write the run elsewhere (`output:` or -o).")


@contextlib.contextmanager
def run_dir_lock(run_dir):
    """One `tcl finetune` per run directory at a time (a cron job overlapping a manual run would interleave two
    runs' checkpoints). An advisory lock that the OS drops when the process dies, so a killed run never blocks the
    next; on systems without fcntl there is no lock."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(os.path.join(run_dir, ".lock"), "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            who = f.read().strip()
            raise TclError(f"Another `tcl finetune` is writing the run directory '{run_dir}'"
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


def _run(session, run_dir, resumed, quiet, log, t_start):
    import yaml

    from .report import compute_metrics, format_table, write_report
    from .runfile import graph_to_json

    recipe, plan, splits = session.recipe, session.plan, session.splits
    start_epoch, history, best, initial, opt_state, best_params = resumed
    t = recipe["train"]
    write_text(os.path.join(run_dir, "recipe.resolved.yaml"),
               yaml.safe_dump(json.loads(json.dumps(dict(recipe), default=str)), sort_keys=False))
    write_json(os.path.join(run_dir, "classes.json"), session.classes)
    feats, cache_info = _cached_sources(session, quiet, log, t["epochs"] - start_epoch)
    trainer = Trainer(session)
    if opt_state is not None:
        trainer.opt.load_state(opt_state)
    src = {name: Source(session, splits[name], feats.get(name), augment=(name == "train"), shuffle=(name == "train"))
           for name in ("train", "val", "test")}
    bs = t["batch_size"]
    es = t["early_stopping"]
    eval_split = "test" if len(src["test"]) else ("val" if len(src["val"]) else "train")
    if not history:
        # Accuracy of the untrained head, so the report shows what fine-tuning changed.
        probs0, y0, _ = predict_source(trainer, src[eval_split], bs)
        if len(y0):
            initial = float(np.mean(np.argmax(probs0, 1) == y0))
            log(f"before     {eval_split} accuracy {initial:.4f} with the new head untrained")
        # The structure only: weights.npz is written when the run finishes, so an unfinished run never offers
        # untrained weights as its result (state.json tells readers to use the last finished epoch instead).
        write_json(os.path.join(run_dir, "model.json"), graph_to_json(plan.graph))
        save_npz(os.path.join(run_dir, "frozen.npz"), {k: v for k, v in plan.graph.params().items()
                                                       if k.split("/", 1)[0] not in plan.trainable})
    metric_name = (es or {}).get("metric", "val_accuracy")
    has_val = len(src["val"]) > 0
    bad_epochs = 0
    if history and es and best:
        bad_epochs = history[-1]["epoch"] - best["epoch"]
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    # The log holds exactly the epochs of the checkpoint (an epoch interrupted after its line was written is redone).
    write_text(metrics_path, "".join(json.dumps(h) + "\n" for h in history))
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, t["epochs"]):
            try:
                loss, acc, n, dt = _train_epoch(trainer, src["train"], t, epoch, quiet)
            except NonFinite as e:
                raise diverged(run_dir, t, epoch, f"{e.what} became {e.value}", history) from None
            session.be.sync_params_to_host(trainer.graph)
            bad = nonfinite_params(trainer.graph, plan.trainable)
            if bad:
                raise diverged(run_dir, t, epoch, f"the parameters {', '.join(bad[:4])} became non-finite", history)
            if runaway_loss(loss, history, len(session.classes)):
                raise diverged(run_dir, t, epoch, f"the training loss rose to {loss:.4g}", history)
            rec = {"epoch": epoch + 1, "lr": lr_at(t, epoch), "train_loss": loss, "train_accuracy": acc,
                   "seconds": round(dt, 3), "images_per_sec": round(n / dt, 1) if dt > 0 else None}
            if has_val:
                probs, yv, _ = predict_source(trainer, src["val"], bs)
                rec["val_loss"] = _cross_entropy(probs, yv)
                rec["val_accuracy"] = float(np.mean(np.argmax(probs, 1) == yv)) if len(yv) else float("nan")
            history.append(rec)
            improved = False
            if has_val:
                v = rec[metric_name]
                improved = best is None or (v > best["value"] if metric_name == "val_accuracy" else v < best["value"])
            if improved:
                best = {"epoch": epoch + 1, "value": rec[metric_name], "metric": metric_name}
                best_params = _trainable_arrays(plan.graph, plan.trainable)
                bad_epochs = 0
            else:
                bad_epochs += 1
            _save_checkpoint(run_dir, trainer, epoch, history, best, initial, best_params)  # the commit point
            if improved:
                _write_best(run_dir, plan.graph, best_params)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            write_state(run_dir, "training", epoch + 1, t["epochs"])
            if not quiet:
                msg = f"epoch {epoch + 1:>3}/{t['epochs']}  loss {rec['train_loss']:.4f}  acc {rec['train_accuracy']:.4f}"
                if has_val:
                    msg += f"  val_loss {rec['val_loss']:.4f}  val_acc {rec['val_accuracy']:.4f}"
                log(msg + f"  {rec['images_per_sec']} img/s")
            if es and has_val and bad_epochs >= es["patience"]:
                log(f"early stopping: no {metric_name} improvement for {es['patience']} epochs")
                break
    except KeyboardInterrupt:
        raise Interrupted(f"Interrupted during epoch {epoch + 1}. The checkpoint of the last finished epoch is in "
                          f"{run_dir}.", "Continue with `tcl finetune RECIPE --resume`.") from None
    finally:
        for so in src.values():
            if so.loader is not None:
                so.loader.close()
    bn_gap = batch_mode_gap(session, trainer, src["train"], history, bs)
    save_npz(os.path.join(run_dir, "weights.npz"), _trainable_arrays(plan.graph, plan.trainable))
    if best is None:
        # No validation split: the final weights are the best we know.
        save_npz(os.path.join(run_dir, "best.npz"), _trainable_arrays(plan.graph, plan.trainable))
        eval_weights = "final"
    else:
        _load_params_into(plan.graph, best_params)
        session.be.forget_params()
        trainer = Trainer(session)
        eval_weights = f"best (epoch {best['epoch']}, {best['metric']} {best['value']:.4f})"
    split = eval_split
    t0 = time.perf_counter()
    probs, yt, paths = predict_source(trainer, src[split], bs)
    dt = time.perf_counter() - t0
    metrics = compute_metrics(yt, np.argmax(probs, 1) if len(yt) else yt, probs, session.classes, paths=paths)
    meta = {"model": recipe["model"], "run_dir": os.path.abspath(run_dir), "split": split, "weights": eval_weights,
            "device": session.be.rt.info.name if hasattr(session.be, "rt") else "numpy",
            "images_per_sec": round(len(yt) / dt, 1) if dt > 0 else None, "epochs": len(history),
            "train_seconds": round(time.perf_counter() - t_start, 1), "cache": cache_info,
            "initial_accuracy": initial, "batchnorm_gap": bn_gap,
            "bad_images": [{"path": p, "reason": r} for p, r in _dedup(session.bad_images)]}
    write_report(run_dir, metrics, meta, history=history)
    write_state(run_dir, FINISHED, _epochs_finished(history), t["epochs"])
    log(format_table(metrics))
    if initial is not None:
        log(f"{split} accuracy {initial:.4f} before fine-tuning -> {metrics['accuracy']:.4f} after "
            f"({len(history)} epochs, {meta['train_seconds']} s)")
    log(f"run directory: {os.path.abspath(run_dir)}")
    return {"run_dir": run_dir, "metrics": metrics, "meta": meta, "history": history}


def _dedup(pairs):
    seen, out = set(), []
    for p, r in pairs:
        if p not in seen:
            seen.add(p)
            out.append((p, r))
    return out
