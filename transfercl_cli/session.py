"""The composition root of a run: a recipe resolved into data splits, a model, a plan, preprocessing, a device and
a memory budget, with every input error raised before any work starts. `tcl finetune`, and through the pieces here
`evaluate`, `predict` and `export-weights`, build on it.
"""
import warnings

import numpy as np

from .data import summarize_bad
from .errors import DataError, RecipeError, TclError

PARAM_TRAINED = ("weight", "bias", "gamma", "beta", "scale", "offset")  # BN mean/var are statistics, not trained


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
    d["size"] = [int(v) for v in size]
    _check_input_size(d["size"], graph, given=bool(recipe_input.get("size")))
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
    elif hint.get("in_model"):
        # The model rescales inside itself (Keras Rescaling/Normalization layers): it takes raw [0, 255] pixels.
        # Applying the hint's scale here too would scale twice, a silently wrong input.
        d["scale"], d["offset"] = 1.0, 0.0
    elif hint.get("scale") is not None:
        d["scale"], d["offset"] = hint["scale"], hint.get("offset", 0.0)
    else:
        d["scale"], d["offset"] = 1.0 / 127.5, -1.0
    for k in ("scale", "offset", "mean", "std"):
        if isinstance(d.get(k), list) and len(d[k]) == 1:
            d[k] = d[k][0]
    return Preprocess.from_dict(d)


def _check_input_size(size, graph, given):
    """A model whose input has a fixed height and width runs at that size only: images resized to another would
    meet shapes (and a feature cache, a memory plan, a flatten + dense head) made for the model's own size."""
    shp = next(iter(graph.inputs.values()), None)
    if shp is None or len(shp) != 3 or not shp[0] or not shp[1] or [int(shp[0]), int(shp[1])] == list(size):
        return
    src = graph.meta.get("source") or "the model"
    where = "Recipe key 'input.size'" if given else "The model's preprocessing"
    raise RecipeError(f"{where} asks for {size[0]}x{size[1]} images, but {src} has a fixed {shp[0]}x{shp[1]} "
                      "input.",
                      f"Set input.size to {shp[0]} (or remove it), or export the model with a dynamic input size "
                      "(ONNX dynamic height/width axes, Keras input_shape=(None, None, 3)) to run it at "
                      f"{size[0]}x{size[1]}.")


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
    shown = summarize_bad(bad)
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
        from .report import format_preprocess

        lines.append(f"input      {format_preprocess(self.pre.to_dict())}")
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
                     f"(parameters {(mem['params'] + mem.get('packed_weights', 0)) / 2**20:.0f}, optimizer+gradients "
                     f"{mem['optimizer_and_grads'] / 2**20:.0f}, activations {mem['activations'] / 2**20:.0f})")
        be = self.be
        dev = be.rt.info.name if hasattr(be, "rt") else "numpy reference (slow fallback)"
        if self.micro_batch:
            lines.append(f"micro      batch {r['train']['batch_size']} does not fit the {self.budget / 2**20:.0f} MiB "
                         f"budget: micro-batches of {self.micro_batch} with gradient accumulation")
        lines.append(f"device     {dev}")
        lines.append(f"output     {r['output']}")
        return "\n".join(lines)
