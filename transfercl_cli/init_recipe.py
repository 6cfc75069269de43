"""`tcl init DATA_DIR --model MODEL`: look at the data and the model, write a commented starting recipe.

Also the graph analysis behind it, shared with `tcl inspect --cut-points` and `tcl bench --train`: where the old
classifier starts (`classifier_cut`), the network's block structure (`articulation`, `block_ends`, `last_block`) and
the cut points worth offering a person (`cut_points`).

The rules, each said again in a comment of the recipe written:
- cut_after: the layer whose output feeds the last global pool (a Keras/ONNX GlobalAveragePooling, a ReduceMean over
  height and width); without one, the input of the last dense/Gemm; without that, no cut.
- freeze: head only (`freeze: all`) when the training split has fewer than FEW_IMAGES_PER_CLASS images per class on
  average (a few hundred images overfit anything more); else the last block trains too (`unfreeze:` its layers):
  the last convolution or dense layer before the cut with its BatchNorm and activation, or the last residual block.
- data.val 0.1 (when the folder has no val/ split) with train.early_stopping 5 epochs.
- input: the model file's own preprocessing when it records one (Keras Rescaling/Normalization layers, a tcl run or
  export), else a guess by format (Keras: [-1, 1] as MobileNet; a torch.onnx export: ImageNet mean/std; a tf2onnx
  export: [-1, 1]) that the comment says to check.
- train.batch_size: 32, halved until a training step's estimate (plan.estimate_memory) fits the memory budget
  (train.memory_budget), and no larger than the training split.
"""
import os
import statistics

from .data import summarize_bad
from .errors import DataError, TclError

FEW_IMAGES_PER_CLASS = 100
SIZES_PER_CLASS = 5  # images per class whose size is read (the header only)
BATCH_START = 32
ACT_OPS = ("relu", "relu6", "clip", "swish", "hard_swish", "sigmoid", "tanh", "leaky_relu", "gelu", "hard_sigmoid")
# Ops that continue a block (a block does not end on a node whose only reader is one of these).
CONTINUE_OPS = ("batchnorm", "scale", "dropout", "identity") + ACT_OPS
# Ops a block can end on.
END_OPS = ("conv2d", "dense", "batchnorm", "scale", "add", "concat", "maxpool", "avgpool") + ACT_OPS
WEIGHT_OPS = ("conv2d", "dense")


# --------------------------------------------------------------------------------------------------------------
# Graph analysis


def _is_global_pool(n, shapes):
    if n.op == "global_avgpool":
        return True
    if n.op in ("reduce_mean", "avgpool"):
        shp = shapes.get(n.inputs[0])
        if shp is None or len(shp) != 3:
            return False
        if n.op == "reduce_mean":
            axes = set(a % 4 for a in (n.attrs.get("axes") or [1, 2, 3]))
            return axes == {1, 2}
        return tuple(n.attrs.get("kernel") or ()) == tuple(shp[:2])
    return False


def _skip_back(graph, t, ops=("dropout", "identity")):
    """The tensor t, or what a chain of `ops` nodes before it reads."""
    prod = graph.producer()
    while t in prod and prod[t].op in ops:
        t = prod[t].inputs[0]
    return t


def classifier_cut(graph, shapes=None):
    """(layer name or None, why): the layer to cut after so that only the old classifier is dropped."""
    from .ops.shapes import infer_shapes

    shapes = shapes if shapes is not None else infer_shapes(graph)
    prod = graph.producer()
    pools = [n for n in graph.nodes if _is_global_pool(n, shapes)]
    if pools:
        t = _skip_back(graph, pools[-1].inputs[0])
        if t in prod:
            return prod[t].name, f"its output feeds the global pool '{pools[-1].name}'"
    dense = [n for n in graph.nodes if n.op == "dense"]
    if dense:
        t = _skip_back(graph, dense[-1].inputs[0], ("dropout", "identity", "flatten", "reshape"))
        if t in prod:
            return prod[t].name, f"its output is the input of the last dense layer '{dense[-1].name}'"
    return None, "the model has neither a global pool nor a dense layer to drop"


def articulation(graph):
    """Positions i (in graph.nodes) after which exactly one tensor, node i's output, carries everything later nodes
    and the outputs need: the places a network can be cut without leaving a branch behind."""
    pos = {t: i for i, n in enumerate(graph.nodes) for t in n.outputs}
    last = {}
    for i, n in enumerate(graph.nodes):
        for t in n.inputs:
            if t in pos or t in graph.inputs:
                last[t] = i
    end = len(graph.nodes)
    for t in graph.outputs:
        last[t] = end
    live = {t for t in graph.inputs if last.get(t, -1) >= 0}
    out = []
    for i, n in enumerate(graph.nodes):
        live.update(t for t in n.outputs if last.get(t, -1) > i)
        live.difference_update([t for t in list(live) if last.get(t, -1) <= i])
        if len(live) == 1 and n.outputs[0] in live:
            out.append(i)
    return out


def block_ends(graph, upto=None):
    """Positions of articulation nodes that end a block (a conv/BN/activation group, a residual block, a pool): the
    next node does not continue it (BatchNorm, activation, ...). Only positions <= upto when given."""
    cons = graph.consumers()
    out = []
    for i in articulation(graph):
        if upto is not None and i > upto:
            break
        n = graph.nodes[i]
        if n.op not in END_OPS:
            continue
        nxt = cons.get(n.outputs[0], [])
        if len(nxt) == 1 and nxt[0].op in CONTINUE_OPS:
            continue
        out.append(i)
    return out


def last_block(graph, cut_name):
    """The layers (with parameters) of the last block that ends at `cut_name`: back from the cut over articulation
    points until a convolution or dense layer is included (for a plain stack: that layer, its BatchNorm and
    activation; for a residual network: the whole last residual block)."""
    names = graph.names()
    c = names.index(cut_name)
    arts = [i for i in articulation(graph) if i < c]
    hi = c
    layers = []
    while True:
        lo = max([i for i in arts if i < hi], default=-1)
        seg = graph.nodes[lo + 1:hi + 1]
        layers = seg + layers
        if any(n.op in WEIGHT_OPS and n.params for n in seg) or lo < 0:
            break
        hi = lo
    return [n.name for n in layers if n.params]


def _hw(shape):
    return f"{shape[0]}x{shape[1]}" if len(shape) == 3 else None


def _fmt_shape(shape):
    return "x".join(str(v) for v in shape)


def cut_points(graph, last=6):
    """Sensible values for `cut_after`, latest first: the input of the old classifier, the ends of the last `last`
    blocks, and the last block end at each spatial resolution. Each: {position (1-based, as the rows of `tcl
    inspect`), name, op, type, output_shape, why}."""
    from .ops.shapes import infer_shapes

    shapes = infer_shapes(graph)
    cls_name, cls_why = classifier_cut(graph, shapes)
    names = graph.names()
    upto = names.index(cls_name) if cls_name else len(graph.nodes) - 1
    first_weights = next((i for i, n in enumerate(graph.nodes) if n.op in WEIGHT_OPS and n.params), 0)
    ends = [i for i in block_ends(graph, upto) if i >= first_weights]  # not the input's own rescaling
    cons = graph.consumers()
    residual = set()
    for i in ends:
        n = graph.nodes[i]
        src = n if n.op == "add" else None
        if src is None and n.op in ACT_OPS:
            p = graph.producer().get(n.inputs[0])
            src = p if p is not None and p.op == "add" else None
        if src is not None and len([t for t in src.inputs if t in graph.producer() or t in graph.inputs]) >= 2:
            residual.add(i)
    why = {}

    def add(i, text):
        why.setdefault(i, [])
        if text not in why[i]:
            why[i].append(text)

    if cls_name:
        add(upto, f"the usual cut: {cls_why}, so only the old classifier is dropped")
    n_res = sorted(residual)
    for k, i in enumerate(ends):
        if i in residual:
            add(i, f"end of residual block {n_res.index(i) + 1} of {len(n_res)}")
        elif k >= len(ends) - last:
            add(i, f"end of block {k + 1} of {len(ends)}")
    by_res = {}
    for i in ends:
        r = _hw(shapes[graph.nodes[i].outputs[0]])
        if r:
            by_res[r] = i
    for r, i in by_res.items():
        add(i, f"last block at {r}")
    keep = sorted(why, reverse=True)
    recent = [i for i in keep if i in residual][:last]
    keep = [i for i in keep if i not in residual or i in recent or len(why[i]) > 1]
    out = []
    for i in keep:
        n = graph.nodes[i]
        prev = max([j for j in ends if j < i], default=-1)
        out.append({"position": i + 1, "name": n.name, "op": n.op, "type": n.source or n.op,
                    "output_shape": list(shapes[n.outputs[0]]), "why": "; ".join(why[i]),
                    # the layers with weights of the block ending here (what `unfreeze` names to train it)
                    "block_layers": [m.name for m in graph.nodes[prev + 1:i + 1] if m.params],
                    "readers": [c.name for c in cons.get(n.outputs[0], [])]})
    return out


def cut_points_text(model, points, total):
    if not points:
        return f"{model}: no cut points found (the network has no single-tensor place to cut before its output)."
    w = max(len(p["name"]) for p in points)
    sw = max(len(_fmt_shape(p["output_shape"])) for p in points)
    lines = [f"{model}: cut points (`cut_after: LAYER` keeps LAYER and everything before it; positions are rows of "
             f"`tcl inspect`, of {total})",
             f"{'position':>8}  {'layer':<{w}}  {'output':<{sw}}  why"]
    for p in points:
        layers = p["block_layers"]
        inside = (f"; block layers: {', '.join(layers[:4])}{', ...' if len(layers) > 4 else ''}" if layers else "")
        lines.append(f"{'#' + str(p['position']):>8}  {p['name']:<{w}}  {_fmt_shape(p['output_shape']):<{sw}}  "
                     f"{p['why']} ({p['type']}{inside})")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Data


def _image_sizes(splits, classes, per_class=SIZES_PER_CLASS):
    """(width, height) of a few images per class (spread over the class's files), from the file headers."""
    from PIL import Image

    by_class = {}
    for name in ("train", "val", "test"):
        for p, y in splits[name]:
            by_class.setdefault(y, []).append(p)
    sizes = []
    for y in sorted(by_class):
        paths = sorted(by_class[y])
        step = max(1, len(paths) // per_class)
        for p in paths[::step][:per_class]:
            try:
                with Image.open(p) as im:
                    sizes.append(im.size)
            except Exception:  # noqa: BLE001 - unreadable files are counted separately
                pass
    return sizes


def scan_data(root, val, test):
    """What `init` needs to know about a dataset folder: classes, images per class, the split (with val/test as
    given), a sample of image sizes and the unreadable files."""
    from .data import find_unreadable, load_splits

    splits = load_splits(root, val=val, test=test, seed=0)
    classes = list(splits.classes)
    counts = splits.counts()
    total = [sum(counts[s][i] for s in counts) for i in range(len(classes))]
    bad = find_unreadable([p for s in ("train", "val", "test") for p, _ in splits[s]])
    return {"root": os.path.abspath(root), "classes": classes, "per_class": total, "layout": splits.layout,
            "split_counts": {s: sum(c) for s, c in counts.items()}, "train_per_class": counts["train"],
            "sizes": _image_sizes(splits, classes), "unreadable": bad, "splits": splits}


# --------------------------------------------------------------------------------------------------------------
# Preprocessing


IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def guess_preprocess(graph):
    """({input keys}, [comment lines]) for the recipe's `input` section."""
    meta = graph.meta
    pre = meta.get("preprocess")
    fmt = meta.get("format") or ("tcl run" if "classes" in meta else "unknown")
    if isinstance(pre, dict) and pre.get("in_model"):
        return ({"scale": 1, "offset": 0},
                ["The model rescales its input itself (Rescaling/Normalization layers, run inside the graph): it "
                 "takes raw pixels [0, 255]."])
    if isinstance(pre, dict) and (pre.get("mean") is not None or pre.get("scale") is not None):
        keys = {k: pre[k] for k in ("mean", "std", "scale", "offset", "resize", "channel_order") if
                pre.get(k) is not None}
        return keys, ["The model file records how it was trained (a tcl run or export): these are its values."]
    producer = (meta.get("producer") or "").lower()
    if fmt == "onnx" and "tf2onnx" not in producer and "keras" not in producer:
        return ({"mean": IMAGENET_MEAN, "std": IMAGENET_STD},
                [f"A GUESS TO CHECK: an ONNX file{' from ' + meta['producer'] if meta.get('producer') else ''} "
                 "records no preprocessing; torchvision models want ImageNet mean/std (below). A model trained "
                 "otherwise needs its own values (README, 'Model formats')."])
    how = "a tf2onnx export of a Keras model" if fmt == "onnx" else "a Keras model"
    return ({"scale": 0.00784313725, "offset": -1.0},
            [f"A GUESS TO CHECK: {how} that records no preprocessing; Keras MobileNet, MobileNetV2, Inception and "
             "Xception take [-1, 1] (below). Keras ResNet50/VGG want `channel_order: BGR, scale: 1, offset: "
             "[-103.939, -116.779, -123.68]`; EfficientNet and MobileNetV3 `scale: 1, offset: 0` (README, 'Model "
             "formats')."])


# --------------------------------------------------------------------------------------------------------------
# The recipe


def _rel(path, base):
    """`path` relative to the recipe's folder when they share a folder below the root (the recipe moves with the
    project), else absolute."""
    path = os.path.abspath(path)
    try:
        common = os.path.commonpath([path, os.path.abspath(base)])
        if os.path.dirname(common) == common:  # only the root (or drive) in common
            return path
        return os.path.relpath(path, base)
    except ValueError:  # another drive (Windows)
        return path


def _y(v):
    """One YAML value in flow style (quoted only where YAML needs it)."""
    import yaml

    text = yaml.safe_dump(v, default_flow_style=True, width=10**6, allow_unicode=True).strip()
    return text[:-4].strip() if text.endswith("\n...") else text


def _wrap(text, indent="# ", width=116):
    import textwrap

    return textwrap.wrap(text, width=width, initial_indent=indent, subsequent_indent=indent) or [indent.rstrip()]


def choose_batch(plan, budget, n_train, start=BATCH_START):
    """(batch, estimated bytes): `start` halved until a training step's estimate fits `budget`, at most the
    training split (rounded down to a power of two)."""
    from .plan import estimate_memory

    b = start
    while b > 1 and b > max(1, n_train):
        b //= 2
    while True:
        need = estimate_memory(plan, b)["total"]
        if need <= budget or b == 1:
            return b, need
        b //= 2


def _size_summary(sizes):
    if not sizes:
        return "no image could be read"
    ws = sorted(w for w, _ in sizes)
    hs = sorted(h for _, h in sizes)
    lo = min(sizes, key=lambda s: s[0] * s[1])
    hi = max(sizes, key=lambda s: s[0] * s[1])
    med = f"{int(statistics.median(ws))}x{int(statistics.median(hs))}"
    if lo == hi:
        return f"all {lo[0]}x{lo[1]} (width x height) in a sample of {len(sizes)}"
    return (f"{lo[0]}x{lo[1]} to {hi[0]}x{hi[1]} (width x height), median {med}, in a sample of {len(sizes)}")


def build_recipe(data_dir, model, out_path, device=None, config=None, input_size=None):
    """(recipe text, summary dict): the recipe `init` writes, already checked: it loads as a recipe and builds a
    plan."""
    import yaml

    from .backends import make_backend
    from .plan import build_plan
    from .recipe import recipe_from_dict
    from .runfile import load_any_model
    from .train import memory_budget

    base = os.path.dirname(os.path.abspath(out_path))
    graph = load_any_model(model, config=config, input_size=input_size)
    from .ops.shapes import infer_shapes

    try:
        shapes = infer_shapes(graph)
    except Exception as e:  # noqa: BLE001 - a dynamic input size: the user has to give one
        raise TclError(f"The shapes of '{model}' cannot be worked out ({e}).",
                       "Give the input size with --input-size H W.") from None
    from .data import load_splits

    probe = load_splits(data_dir, val=0.0, test=0.0)
    has_split_folders = probe.layout == "folders"
    val = 0.0 if has_split_folders and probe["val"] else 0.1  # a val/ folder is used as it is
    test = 0.0 if has_split_folders else 0.2  # a test/ folder is used as it is (none: no test split)
    data = scan_data(data_dir, val, test)
    classes = data["classes"]
    if len(classes) < 2:
        raise DataError(f"'{data_dir}' has {len(classes)} class folder; a classifier needs two or more.",
                        "Add one sub-folder per class.")
    n_train = data["split_counts"]["train"]
    per_class_train = n_train / len(classes)
    early = data["split_counts"]["val"] > 0

    cut, cut_why = classifier_cut(graph, shapes)
    cut_shape = list(shapes[graph.node(cut).outputs[0]]) if cut else list(shapes[graph.outputs[0]])
    head = ["global_avg_pool", {"dense": "auto"}] if len(cut_shape) == 3 else [{"dense": "auto"}]
    few = per_class_train < FEW_IMAGES_PER_CLASS
    block = [] if few or not cut else last_block(graph, cut)
    unfreeze = [] if few else block

    in_size = graph.meta.get("input_size")
    shp = next(iter(graph.inputs.values()))
    size = list(in_size) if in_size else ([int(shp[0]), int(shp[1])] if len(shp) == 3 and shp[0] else [224, 224])
    pre_keys, pre_notes = guess_preprocess(graph)

    raw = {"model": _rel(os.path.abspath(model), base), "input": {"size": size, **pre_keys}}
    if config:
        raw["model_config"] = _rel(os.path.abspath(config), base)
    if cut:
        raw["cut_after"] = cut
    raw["head"] = head
    raw["freeze"] = "all"
    raw["unfreeze"] = unfreeze
    raw["data"] = {"root": _rel(data["root"], base), "seed": 0}
    if val:
        raw["data"]["val"] = val
    if not has_split_folders:
        raw["data"]["test"] = test
    train = {"epochs": 30, "batch_size": BATCH_START, "optimizer": "adam", "lr": 0.001, "seed": 0}
    if early:
        train["early_stopping"] = 5
    raw["train"] = train
    if device:
        raw["device"] = device

    rec = recipe_from_dict(raw, base_dir=base, path=out_path)
    plan = build_plan(graph, rec, classes)
    be = make_backend(device)
    budget = memory_budget(None, be)
    batch, need = choose_batch(plan, budget, n_train)
    train["batch_size"] = batch
    dev_name = be.rt.info.name if hasattr(be, "rt") else "numpy"

    summary = {"recipe": os.path.abspath(out_path), "classes": classes, "images_per_class": data["per_class"],
               "splits": data["split_counts"], "unreadable": [{"path": p, "reason": r} for p, r in data["unreadable"]],
               "image_sizes": [list(s) for s in data["sizes"]], "cut_after": cut, "head": head,
               "unfreeze": unfreeze, "head_only": not unfreeze, "batch_size": batch, "memory_bytes": int(need),
               "budget_bytes": int(budget), "device": dev_name, "input": raw["input"],
               "train_images_per_class": round(per_class_train, 1)}
    text = _render(raw, summary, data, graph, model, cut_why, few, block, pre_notes, plan)
    back = recipe_from_dict(yaml.safe_load(text), base_dir=base, path=out_path)  # what was written loads
    if back["train"]["batch_size"] != batch or back["cut_after"] != rec["cut_after"]:  # pragma: no cover
        raise TclError("Internal error: the recipe written does not read back as built.",
                       "This is a bug in tcl: report it.")
    return text, summary


def _render(raw, s, data, graph, model, cut_why, few, block, pre_notes, plan):
    import datetime

    from . import __version__

    classes = s["classes"]
    counts = ", ".join(f"{c} {n}" for c, n in list(zip(classes, s["images_per_class"]))[:20])
    if len(classes) > 20:
        counts += f", ... ({len(classes) - 20} more)"
    sp = s["splits"]
    L = []
    L.append(f"# Written by `tcl init` (tcl {__version__}, "
             f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}): a starting point; check the lines marked CHECK.")
    L.append("# Paths are relative to this file. Run `tcl finetune THIS_FILE --dry-run` to see the plan, then without")
    L.append("# --dry-run to train. Every key: README, 'Recipe keys'.")
    L.append("#")
    L += _wrap(f"Data: {data['root']}: {len(classes)} classes, {sum(s['images_per_class'])} images ({counts}).")
    mn, mx = min(s["images_per_class"]), max(s["images_per_class"])
    if mx > 3 * mn:
        L += _wrap(f"CHECK: the classes are unbalanced ({mn} to {mx} images); `train.class_weights: auto` weighs "
                   "the rare ones up.")
    L += _wrap(f"Image sizes: {_size_summary(data['sizes'])}.")
    if data["sizes"]:
        small = sum(1 for w, h in data["sizes"] if min(w, h) < 0.5 * min(raw["input"]["size"]))
        if small:
            L += _wrap(f"CHECK: {small} of the sampled images are under half the model's input size "
                       f"{raw['input']['size'][0]}x{raw['input']['size'][1]}: they are upscaled, which costs "
                       "accuracy; larger photos help more than any setting.")
    bad = data["unreadable"]
    if bad:
        shown = summarize_bad(bad)
        L += _wrap(f"CHECK: {len(bad)} file(s) cannot be read and will be skipped with a note: {shown}. Delete or "
                   "re-export them (or set data.strict: true to make them an error).")
    g_params = graph.num_params()
    L += _wrap(f"Model: {model}: {graph.meta.get('format') or 'tcl run'}, {len(graph.nodes)} layers, "
               f"{g_params:,} parameters.")
    L.append("")
    L.append(f"model: {_y(raw['model'])}")
    if "model_config" in raw:
        L.append(f"model_config: {_y(raw['model_config'])}")
    L.append("")
    L.append("input:")
    L += _wrap(" ".join(pre_notes), indent="  # ")
    for k, v in raw["input"].items():
        L.append(f"  {k}: {_y(v)}")
    L.append("")
    if raw.get("cut_after"):
        L += _wrap(f"Cut after the layer before the old classifier ({cut_why}); `tcl inspect MODEL --cut-points` "
                   "lists other places to cut.")
        L.append(f"cut_after: {_y(raw['cut_after'])}")
    else:
        L += _wrap(f"No cut: {cut_why}. CHECK: choose one with `tcl inspect MODEL --cut-points`.")
    L.append("")
    L.append("# New layers after the cut (dense `auto` = one output per class).")
    L.append(f"head: {_y(raw['head'])}")
    L.append("")
    rule = (f"Rule: with fewer than {FEW_IMAGES_PER_CLASS} training images per class on average only the new head "
            f"trains (more layers would overfit); from {FEW_IMAGES_PER_CLASS} on, the last block trains too. ")
    if few:
        rule += (f"This data has {s['train_images_per_class']:g} per class: head only."
                 + (f" With more images, try `unfreeze: {_y(block)}` (the last block)." if block else ""))
    else:
        rule += (f"This data has {s['train_images_per_class']:g} per class: the last block trains "
                 "(its BatchNorm keeps its moving statistics: train.batchnorm inference).")
    L += _wrap(rule)
    L.append("freeze: all")
    L.append(f"unfreeze: {_y(raw['unfreeze'])}")
    L.append("")
    d = raw["data"]
    L.append("data:")
    L.append(f"  root: {_y(d['root'])}")
    counts_note = f"train {sp['train']}, val {sp['val']}, test {sp['test']} images"
    if data["layout"] == "folders":
        how = (f"The folder's train/ val/ test/ sub-folders are used as they are ({counts_note}"
               + ("; val is carved from train/ by the fraction below" if "val" in d else "") + ").")
    else:
        how = f"Stratified fractions per class, split with the seed: {counts_note}."
    L += _wrap(how + " The validation split picks the best epoch and stops training early; the test split is the "
               "final report.", indent="  # ")
    for k in ("val", "test"):
        if k in d:
            L.append(f"  {k}: {_y(d[k])}")
    L.append(f"  seed: {d['seed']}")
    L.append("")
    t = raw["train"]
    L.append("train:")
    L.append(f"  epochs: {t['epochs']}")
    budget = s["budget_bytes"] / 2**20
    L += _wrap(f"The largest of 32, 16, 8, ... whose training step fits the memory budget on {s['device']}: about "
               f"{s['memory_bytes'] / 2**20:.0f} MiB of {budget:.0f} MiB (train.max_memory_mb sets the budget).",
               indent="  # ")
    L.append(f"  batch_size: {t['batch_size']}")
    L.append(f"  optimizer: {t['optimizer']}")
    L.append(f"  lr: {_y(t['lr'])}")
    if "early_stopping" in t:
        L.append("  # Stop when the validation accuracy has not improved for this many epochs.")
        L.append(f"  early_stopping: {t['early_stopping']}")
    L.append(f"  seed: {t['seed']}")
    if raw.get("device"):
        L.append("")
        L.append(f"device: {_y(raw['device'])}")
    L.append("")
    L.append("# output: runs/<this file's name>   (the run directory; the default)")
    if plan.use_cache:
        L.append("# augment: {hflip: true} helps with few images, but turns the frozen-layer feature cache off (slower).")
    return "\n".join(L) + "\n"


def init_recipe(data_dir, model, output="recipe.yaml", force=False, device=None, config=None, input_size=None):
    """Write the recipe (atomically; refuses to replace a file without force). Returns the summary."""
    from .fsutil import write_text

    if os.path.isdir(output):
        raise TclError(f"'{output}' is a folder.", "Give the recipe file to write with -o, e.g. -o recipe.yaml.")
    if os.path.exists(output) and not force:
        raise TclError(f"'{output}' already exists.", "Pass --force to replace it, or choose another file with -o.")
    text, summary = build_recipe(data_dir, model, output, device=device, config=config, input_size=input_size)
    write_text(output, text)
    return summary
