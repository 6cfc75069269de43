"""From a recipe and a pretrained graph to what will run: cut, new head, frozen/trainable layers, folded
BatchNorms, and the frozen prefix whose output can be cached.
"""
import fnmatch
import functools
import hashlib
from dataclasses import dataclass, field

import numpy as np

from .errors import RecipeError, closest
from .graph import Graph, Node

ACT_OPS = {"relu": "relu", "relu6": "relu6"}
# Activations the convolution and GEMM epilogues apply too (kernels/fused_act.h) but cannot differentiate: fused by
# fold_frozen(..., engine=True) into a frozen conv/dense where no gradient flows (inference; the frozen layers before
# the first trainable one). One pass over the output instead of two (EfficientNet's swish, MobileNetV3's hard-swish).
ENGINE_ACTS = ("swish", "sigmoid", "hard_swish", "hard_sigmoid")


def _clip_as_act(n):
    if n.op == "clip" and n.attrs.get("min") == 0 and n.attrs.get("max") == 6:
        return "relu6"
    return ACT_OPS.get(n.op)


def _epilogue_act(n, no_grad):
    """The activation node n as a fused epilogue activation: ReLU/ReLU6 anywhere, ENGINE_ACTS where no_grad
    (hard_sigmoid only as PyTorch's alpha 1/6, beta 1/2, the one the kernels compute), else None."""
    act = _clip_as_act(n)
    if act or not no_grad or n.op not in ENGINE_ACTS:
        return act
    if n.op == "hard_sigmoid" and not (abs(float(n.attrs.get("alpha", 0.2)) - 1 / 6) < 1e-6
                                       and float(n.attrs.get("beta", 0.5)) == 0.5):
        return None
    return n.op


def _residual_add(graph, cons, conv, grad, trainable, shapes):
    """(add, act, residual) when conv's output (BN folded, no activation) is read only by a two-input Add of
    same-shaped tensors where no gradient flows: the Add (and a ReLU-like activation after it) can run in the
    convolution's epilogue, reading the other input `residual`. act is the node fused after it or None."""
    nxt = cons.get(conv.outputs[0], [])
    y = conv.outputs[0]
    if (conv.op != "conv2d" or conv.attrs.get("act") or len(nxt) != 1 or nxt[0].op != "add"
            or nxt[0].name in trainable or nxt[0].params or len(nxt[0].inputs) != 2 or nxt[0].inputs.count(y) != 1
            or y in graph.outputs or nxt[0].outputs[0] in grad):
        return None
    add = nxt[0]
    r = add.inputs[0] if add.inputs[1] == y else add.inputs[1]
    sh = shapes()
    if not (tuple(sh[r]) == tuple(sh[y]) == tuple(sh[add.outputs[0]])):
        return None
    after = cons.get(add.outputs[0], [])
    act = after[0] if len(after) == 1 and add.outputs[0] not in graph.outputs else None
    if act is not None and (act.name in trainable or not _epilogue_act(act, True)):
        act = None
    return add, act, r


def _gradient_tensors(graph, trainable):
    """Tensors a gradient reaches: outputs of trainable layers with parameters and everything computed from them."""
    grad = set()
    for n in graph.nodes:
        if (n.name in trainable and n.params) or any(t in grad for t in n.inputs):
            grad.update(n.outputs)
    return grad


def cut_after(graph, layer):
    """Keep `layer` and everything it depends on; its output becomes the graph output."""
    node = _find(graph, layer, "cut_after")
    g = Graph(list(graph.nodes), dict(graph.inputs), [node.outputs[0]], graph.name, dict(graph.meta))
    g.prune()
    return g


def _find(graph, name, key):
    for n in graph.nodes:
        if n.name == name:
            return n
    hint = closest(name, graph.names())
    raise RecipeError(
        f"Recipe key '{key}': the model has no layer named '{name}'." + (f" Did you mean '{hint}'?" if hint else ""),
        "Run `tcl inspect MODEL` to list the layer names.",
    )


def _unique(graph, base):
    names = set(graph.names())
    if base not in names:
        return base
    i = 1
    while f"{base}_{i}" in names:
        i += 1
    return f"{base}_{i}"


def add_head(graph, head, num_classes, seed=0):
    """Append the recipe's head layers after the graph's (single) output. Returns the new node names."""
    from .ops.shapes import infer_shapes

    rng = np.random.default_rng(seed)
    shapes = infer_shapes(graph)
    t = graph.outputs[0]
    shape = list(shapes[t])
    new = []
    for i, layer in enumerate(head):
        kind, arg = next(iter(layer.items()))
        name = _unique(graph, f"head_{kind}")
        out = f"{name}:0"
        if kind == "global_avg_pool":
            if len(shape) != 3:
                raise RecipeError(f"Recipe key 'head': global_avg_pool needs an image-shaped input (H, W, C), but the "
                                  f"cut point's output has shape {tuple(shape)}.",
                                  "Cut at a convolutional layer, or use dense directly.")
            node = Node(name, "global_avgpool", [t], [out], {"keepdims": False})
            shape = [shape[-1]]
        elif kind == "flatten":
            node = Node(name, "flatten", [t], [out])
            shape = [int(np.prod(shape))]
        elif kind == "dropout":
            node = Node(name, "dropout", [t], [out], {"rate": float(arg or 0.0), "seed": int(seed) + i})
        elif kind in ("relu", "relu6"):
            node = Node(name, kind, [t], [out])
        elif kind == "batchnorm":
            c = shape[-1]
            node = Node(name, "batchnorm", [t], [out], {"eps": 1e-3, "momentum": 0.99},
                        {"gamma": np.ones(c, np.float32), "beta": np.zeros(c, np.float32),
                         "mean": np.zeros(c, np.float32), "var": np.ones(c, np.float32)})
        elif kind == "dense":
            if len(shape) != 1:
                # A dense layer on an image-shaped tensor flattens it first (as Keras users expect).
                fl = _unique(graph, f"{name}_flatten")
                graph.nodes.append(Node(fl, "flatten", [t], [f"{fl}:0"]))
                new.append(fl)
                t = f"{fl}:0"
                shape = [int(np.prod(shape))]
            units = num_classes if arg == "auto" else int(arg)
            cin = shape[0]
            limit = np.sqrt(6.0 / (cin + units))  # Glorot uniform, as Keras initialises Dense
            node = Node(name, "dense", [t], [out], {},
                        {"weight": rng.uniform(-limit, limit, (cin, units)).astype(np.float32),
                         "bias": np.zeros(units, np.float32)})
            shape = [units]
        else:  # pragma: no cover - the recipe validator rejects these
            raise RecipeError(f"Unknown head layer {kind}")
        node.source = "head"
        graph.nodes.append(node)
        new.append(name)
        t = out
    if shape != [num_classes]:
        raise RecipeError(f"Recipe key 'head': the head ends with shape {tuple(shape)}, but the data has "
                          f"{num_classes} classes.", "End the head with `{dense: auto}`.")
    graph.outputs = [t]
    return new


def resolve_freeze(graph, freeze, unfreeze, new_layers=()):
    """The set of trainable layer names (only layers with parameters matter). New head layers always train."""
    pretrained = [n.name for n in graph.nodes if n.name not in set(new_layers)]
    names = set(pretrained)

    def match(patterns, key):
        out = set()
        for p in patterns:
            hits = {n for n in pretrained if fnmatch.fnmatchcase(n, p)}
            if not hits:
                hint = closest(p, pretrained)
                raise RecipeError(
                    f"Recipe key '{key}': '{p}' matches no layer of the model."
                    + (f" Did you mean '{hint}'?" if hint else ""),
                    "Names and glob patterns (conv_pw_13*) are matched against the layer names `tcl inspect MODEL` "
                    "lists.",
                )
            out |= hits
        return out

    if freeze == "all":
        frozen = set(names)
    elif freeze == "none":
        frozen = set()
    elif isinstance(freeze, dict):
        until = _find(graph, freeze["until"], "freeze.until").name
        frozen = set()
        for n in pretrained:
            frozen.add(n)
            if n == until:
                break
    else:
        frozen = match(freeze, "freeze")
    frozen -= match(unfreeze, "unfreeze")
    trainable = (names - frozen) | set(new_layers)
    return {n.name for n in graph.nodes if n.name in trainable and n.params}


def set_batchnorm_modes(graph, trainable, new_layers, modes):
    """Mark each trainable pretrained BatchNorm with attr bn_mode: 'inference' (normalise with its moving statistics,
    which stay as they are; gamma and beta train: Keras's advice for fine-tuning) or 'batch' (the batch's
    statistics, moving ones updated). `modes`: the recipe's train.batchnorm ({default: MODE, LAYER or pattern: MODE}).
    A BatchNorm of the new head has no statistics worth keeping and always runs in batch mode."""
    patterns = {k: v for k, v in modes.items() if k != "default"}
    bns = [n for n in graph.nodes if n.op == "batchnorm" and n.name in trainable and n.name not in set(new_layers)]
    for p in patterns:
        if not any(fnmatch.fnmatchcase(n.name, p) for n in bns):
            hint = closest(p, [n.name for n in bns])
            raise RecipeError(f"Recipe key 'train.batchnorm.{p}': matches no trainable pretrained BatchNorm."
                              + (f" Did you mean '{hint}'?" if hint else ""),
                              "Name a BatchNorm layer that the recipe unfreezes (`tcl finetune RECIPE --dry-run` "
                              "lists them).")
    for n in graph.nodes:
        if n.op != "batchnorm" or n.name not in trainable:
            continue
        mode = "batch" if n.name in set(new_layers) else next(
            (m for p, m in patterns.items() if fnmatch.fnmatchcase(n.name, p)), modes.get("default", "batch"))
        n.attrs["bn_mode"] = mode


def batchnorm_summary(plan):
    """'conv_pw_13_bn (inference mode)' for each trainable BatchNorm, for the plan text."""
    return [f"{n.name} ({n.attrs.get('bn_mode', 'batch')} mode)" for n in plan.graph.nodes
            if n.op == "batchnorm" and n.name in plan.trainable]


def fold_frozen(graph, trainable, engine=False):
    """The graph that runs: frozen Conv+BN folded into the conv's weights and bias, a following ReLU/ReLU6 fused into
    the conv's epilogue (or, where the BN stays, into the BN, with a global average pool after it), zero Pads into
    the next conv's padding. Trainable nodes are the same objects or share their parameter dicts, so updates made
    through the returned graph are seen by `graph`. engine=True (the graph tcl's own executor runs, not one to
    export): swish, sigmoid, hard-swish and hard-sigmoid fused too where no gradient flows (ENGINE_ACTS), and so is a
    residual Add after a frozen convolution (with the activation after it), which the convolution then adds in its
    epilogue (attrs 'residual': the other input is the node's last input; the node takes the Add's place)."""
    cons = graph.consumers()
    grad = _gradient_tensors(graph, trainable) if engine else None
    out_nodes = []
    skip = set()
    at_add = {}  # Add name -> the convolution that absorbed it, placed there (its residual input exists by then)

    @functools.cache
    def shapes():  # only when a residual Add is a candidate
        from .ops.shapes import infer_shapes

        return infer_shapes(graph)

    # A zero Pad read only by a convolution becomes that convolution's own padding (frozen or trainable: a Pad has
    # no parameters, and the padded copy would otherwise be kept for the backward pass). A trainable convolution
    # keeps its parameter dict (the same object), so updates are seen by `graph`.
    pad_into = {}
    for n in graph.nodes:
        nxt = cons.get(n.outputs[0], [])
        if (n.op == "pad" and float(n.attrs.get("value", 0.0)) == 0.0 and min(n.attrs["pads"]) >= 0
                and len(n.attrs["pads"]) == 4 and len(nxt) == 1 and nxt[0].op == "conv2d"
                and n.outputs[0] not in graph.outputs):
            pad_into[nxt[0].name] = n
            skip.add(n.name)
    # A channel Concat read only by a frozen BatchNorm that no gradient reaches (DenseNet normalises the Concat of
    # every feature map before each dense layer): the BatchNorm takes the Concat's inputs (attr concat) and
    # normalises each straight into its slice of the output, so the Concat's output is never written and read back.
    concat_into = _concats_into_batchnorm(graph, cons, trainable, grad, shapes) if engine else {}
    skip.update(c.name for c in concat_into.values())
    for n in graph.nodes:
        if n.name in at_add:
            out_nodes.append(at_add.pop(n.name))
            continue
        if n.name in skip:
            continue
        if n.name in pad_into:
            pad = pad_into[n.name]
            n = Node(n.name, n.op, [pad.inputs[0]] + list(n.inputs[1:]), list(n.outputs),
                     dict(n.attrs, pads=tuple(int(a) + int(b) for a, b in zip(n.attrs["pads"], pad.attrs["pads"])),
                          folded=[pad.name]), n.params if n.name in trainable else dict(n.params), n.source)
        bn_after = _trainable_bn(graph, cons, n, trainable) if engine else None
        if bn_after is not None:
            # A trainable convolution carries the trainable BatchNorm (inference mode) after it and its ReLU/ReLU6:
            # it folds the BN's current coefficients into its weights on the device each pass (attr bn, the BN node
            # itself, whose parameter dict is shared) and writes the BN's output, so the BN's input is never stored
            # and the BN pass is gone; its backward gives the BN's parameter gradients too.
            tail = [t for t in bn_after if t is not None]
            attrs = dict(n.attrs, bn=tail[0], folded=n.attrs.get("folded", []) + [t.name for t in tail])
            if bn_after[1] is not None:
                attrs["act"] = _clip_as_act(bn_after[1])
            out_nodes.append(Node(n.name, n.op, list(n.inputs), list(tail[-1].outputs), attrs, n.params, n.source))
            skip.update(t.name for t in tail)
            continue
        act_after = _trainable_act(graph, cons, n, trainable) if engine else None
        if act_after is not None:
            # A trainable convolution or Dense carries the ReLU/ReLU6 after it (its backward masks the gradient by
            # its output, which the next layer keeps anyway): one pass less forward and backward. Its parameter
            # dict is shared, so updates are seen by `graph`.
            out_nodes.append(Node(n.name, n.op, list(n.inputs), list(act_after.outputs),
                                  dict(n.attrs, act=_clip_as_act(act_after),
                                       folded=n.attrs.get("folded", []) + [act_after.name]), n.params, n.source))
            skip.add(act_after.name)
            continue
        if n.op in ("conv2d", "dense") and n.name not in trainable and not n.attrs.get("act"):
            cur = n
            merged = []
            nxt = cons.get(cur.outputs[0], [])
            if (n.op == "conv2d" and len(nxt) == 1 and nxt[0].op == "batchnorm" and nxt[0].name not in trainable
                    and cur.outputs[0] not in graph.outputs):
                bn = nxt[0]
                w = cur.params["weight"].astype(np.float64)
                b = cur.params.get("bias")
                b = np.zeros(w.shape[-1]) if b is None else b.astype(np.float64)
                s = bn.params["gamma"].astype(np.float64) / np.sqrt(bn.params["var"].astype(np.float64) + bn.attrs["eps"])
                cur = Node(cur.name, cur.op, list(cur.inputs), list(bn.outputs), dict(cur.attrs),
                           {"weight": (w * s).astype(np.float32),
                            "bias": ((b - bn.params["mean"]) * s + bn.params["beta"]).astype(np.float32)},
                           cur.source)
                cur.attrs["folded"] = n.attrs.get("folded", []) + [bn.name]
                skip.add(bn.name)
                merged.append(bn)
                nxt = cons.get(cur.outputs[0], [])
            fused = _epilogue_act(nxt[0], engine and n.outputs[0] not in grad) if len(nxt) == 1 else None
            if fused and nxt[0].name not in trainable and cur.outputs[0] not in graph.outputs:
                act = nxt[0]
                if cur is n:
                    cur = Node(n.name, n.op, list(n.inputs), list(n.outputs), dict(n.attrs), dict(n.params), n.source)
                cur.attrs["act"] = fused
                cur.attrs["folded"] = cur.attrs.get("folded", []) + [act.name]
                cur.outputs = list(act.outputs)
                skip.add(act.name)
            fused_add = _residual_add(graph, cons, cur, grad, trainable, shapes) if engine else None
            if fused_add and fused_add[0].name not in skip:
                add, act, r = fused_add
                if cur is n:
                    cur = Node(n.name, n.op, list(n.inputs), list(n.outputs), dict(n.attrs), dict(n.params), n.source)
                tail = [add] + ([act] if act is not None else [])
                cur.inputs = list(cur.inputs) + [r]
                cur.attrs.update(residual=True, folded=cur.attrs.get("folded", []) + [t.name for t in tail])
                if act is not None:
                    cur.attrs["act"] = _epilogue_act(act, True)
                cur.outputs = list(tail[-1].outputs)
                skip.update(t.name for t in tail)
                at_add[add.name] = cur
                continue
            out_nodes.append(cur)
        elif n.op == "batchnorm" and not n.attrs.get("act") and not n.attrs.get("pool"):
            # A BatchNorm left standing (it trains, or its conv does) carries the ReLU/ReLU6 after it, and then a
            # global average pool (a classifier head): one pass instead of two or three forward, and neither the
            # BN output nor the activation is stored. Its parameter dict is shared.
            attrs, outs, tail = dict(n.attrs), list(n.outputs), []
            cat = concat_into.get(n.name)
            if cat is not None:
                n = Node(n.name, n.op, list(cat.inputs), outs, dict(attrs, concat=True), n.params, n.source)
                attrs, tail = dict(n.attrs), [cat]
            nxt = cons.get(outs[0], [])
            act = _clip_as_act(nxt[0]) if len(nxt) == 1 else None
            if act and outs[0] not in graph.outputs:
                attrs["act"] = act
                tail.append(nxt[0])
                outs = list(nxt[0].outputs)
                nxt = cons.get(outs[0], [])
            if (len(nxt) == 1 and nxt[0].op == "global_avgpool" and outs[0] not in graph.outputs
                    and cat is None):  # (the Concat's slices have no pooled kernel)
                attrs.update(pool="global_avg", keepdims=bool(nxt[0].attrs.get("keepdims", False)))
                tail.append(nxt[0])
                outs = list(nxt[0].outputs)
            if tail:
                attrs["folded"] = n.attrs.get("folded", []) + [t.name for t in tail]
                out_nodes.append(Node(n.name, n.op, list(n.inputs), outs, attrs, n.params, n.source))
                skip.update(t.name for t in tail)
            else:
                out_nodes.append(n)
        else:
            out_nodes.append(n)
    g = Graph(out_nodes, dict(graph.inputs), list(graph.outputs), graph.name, dict(graph.meta))
    g.topo_check()
    return g


def _lone_activation(graph, cons, tensor):
    """The ReLU/ReLU6 node that is the only reader of `tensor` (not a graph output), or None: the activation a
    trainable node can carry, its gradient masked by the carrier's output."""
    nxt = cons.get(tensor, [])
    if len(nxt) != 1 or tensor in graph.outputs or not _clip_as_act(nxt[0]) or nxt[0].params:
        return None
    return nxt[0]


def _trainable_act(graph, cons, n, trainable):
    """The ReLU/ReLU6 node that trainable convolution or Dense n can carry (its output's only reader), or None."""
    if n.op not in ("conv2d", "dense") or n.name not in trainable or n.attrs.get("act") or n.attrs.get("residual"):
        return None
    return _lone_activation(graph, cons, n.outputs[0])


def _trainable_bn(graph, cons, n, trainable):
    """(BatchNorm, ReLU/ReLU6 node or None) that trainable convolution n can carry (attr bn): its output's only
    reader is a trainable BatchNorm in inference mode (fixed statistics: an affine map per channel), and that
    BatchNorm's only reader the activation. None where there is no such BatchNorm."""
    if n.op != "conv2d" or n.name not in trainable or n.attrs.get("act") or n.attrs.get("residual"):
        return None
    nxt = cons.get(n.outputs[0], [])
    if len(nxt) != 1 or n.outputs[0] in graph.outputs:
        return None
    bn = nxt[0]
    if (bn.op != "batchnorm" or bn.name not in trainable or bn.attrs.get("bn_mode") != "inference"
            or any(bn.attrs.get(k) for k in ("act", "pool", "concat")) or not {"mean", "var"} <= set(bn.params)):
        return None
    return bn, _lone_activation(graph, cons, bn.outputs[0])


def _concats_into_batchnorm(graph, cons, trainable, grad, shapes):
    """{BatchNorm name: the Concat before it} for fold_frozen: channel Concats read only by a frozen BatchNorm, with
    no gradient through them."""
    out = {}
    for n in graph.nodes:
        nxt = cons.get(n.outputs[0], [])
        if (n.op != "concat" or len(nxt) != 1 or nxt[0].op != "batchnorm" or nxt[0].name in trainable
                or nxt[0].attrs.get("act") or nxt[0].attrs.get("pool") or n.outputs[0] in graph.outputs
                or n.outputs[0] in grad):
            continue
        rank = len(shapes()[n.outputs[0]]) + 1  # with the batch axis
        axis = int(n.attrs.get("axis", -1))
        if rank >= 2 and (axis + rank if axis < 0 else axis) == rank - 1:
            out[nxt[0].name] = n
    return out


def fused_label(node):
    """The op with what fold_frozen fused into it, e.g. 'batchnorm+relu6+gap' or 'concat+batchnorm+relu' (benchmarks
    and reports)."""
    act = "+" + node.attrs["act"] if node.attrs.get("act") else ""
    a = node.attrs
    return (("concat+" if a.get("concat") else "") + node.op + ("+batchnorm" if a.get("bn") else "")
            + ("+add" if a.get("residual") else "") + act
            + ("+gap" if a.get("pool") else ""))


def split_prefix(graph, trainable):
    """Split into (prefix, suffix, tensor) where the prefix is frozen and the suffix reads only `tensor` from it.

    Returns (None, graph, None, reason) when there is no such split."""
    first = None
    grad = set()
    for i, n in enumerate(graph.nodes):
        if n.name in trainable or any(t in grad for t in n.inputs):
            grad.update(n.outputs)
            if first is None:
                first = i
    if first is None:
        return None, graph, None, "no layer trains"
    if first == 0:
        return None, graph, None, "the first layer trains, so there is no frozen prefix"
    prefix_nodes = graph.nodes[:first]
    suffix_nodes = graph.nodes[first:]
    produced = set(graph.inputs) | {t for n in prefix_nodes for t in n.outputs}
    crossing = {t for n in suffix_nodes for t in n.inputs if t in produced}
    crossing |= {t for t in graph.outputs if t in produced}
    if len(crossing) != 1:
        return None, graph, None, f"the trainable part reads {len(crossing)} tensors of the frozen part"
    t = crossing.pop()
    if t in graph.inputs:
        return None, graph, None, "the first layer trains, so there is no frozen prefix"
    from .ops.shapes import infer_shapes

    shapes = infer_shapes(graph)
    prefix = Graph(list(prefix_nodes), dict(graph.inputs), [t], graph.name + ":prefix", dict(graph.meta))
    prefix.prune()
    suffix = Graph(list(suffix_nodes), {t: tuple(shapes[t])}, list(graph.outputs), graph.name + ":suffix",
                   dict(graph.meta))
    return prefix, suffix, t, None


def graph_digest(graph):
    """A hash of a graph's structure and parameters (for cache keys)."""
    h = hashlib.sha256()
    for n in graph.nodes:
        h.update(repr((n.name, n.op, n.inputs, n.outputs, sorted((k, repr(v)) for k, v in n.attrs.items()))).encode())
        for k in sorted(n.params):
            h.update(k.encode())
            h.update(np.ascontiguousarray(n.params[k]).tobytes())
    return h.hexdigest()


@dataclass
class Plan:
    graph: Graph  # the full training graph (pretrained part after the cut + head), unfolded
    exec_graph: Graph  # frozen Conv+BN(+act) folded
    trainable: set
    frozen: list
    cut: list
    new: list
    prefix: Graph = None
    suffix: Graph = None
    cache_tensor: str = None
    cache_reason: str = None
    use_cache: bool = False
    half_saved: bool = False  # precision: fp16 keeps the backward's activations as half precision
    memory: dict = field(default_factory=dict)


def build_plan(model_graph, recipe, classes):
    graph = model_graph.copy()
    all_names = graph.names()
    if recipe.get("cut_after"):
        graph = cut_after(graph, recipe["cut_after"])
    kept = set(graph.names())
    cut = [n for n in all_names if n not in kept]
    new = add_head(graph, recipe["head"], len(classes), seed=recipe["train"]["seed"])
    trainable = resolve_freeze(graph, recipe["freeze"], recipe["unfreeze"], new)
    set_batchnorm_modes(graph, trainable, new, recipe["train"].get("batchnorm") or {"default": "batch"})
    frozen = [n.name for n in graph.nodes if n.params and n.name not in trainable]
    exec_graph = fold_frozen(graph, trainable, engine=True)
    plan = Plan(graph, exec_graph, trainable, frozen, cut, new, half_saved=recipe["precision"] == "fp16")
    aug = recipe["augment"]
    if recipe["train"]["cache"] == "off":
        plan.cache_reason = "off in the recipe (train.cache: off)"
    elif aug["hflip"] or aug["random_resized_crop"] or aug["brightness"] or aug["contrast"]:
        plan.cache_reason = "augmentation is on, so the frozen prefix must see each augmented image every epoch"
    else:
        prefix, suffix, t, reason = split_prefix(exec_graph, trainable)
        if prefix is not None:
            plan.prefix, plan.suffix, plan.cache_tensor, plan.use_cache = prefix, suffix, t, True
        else:
            plan.cache_reason = reason
    plan.memory = estimate_memory(plan, recipe["train"]["batch_size"])
    return plan


# What each op's saved-for-backward context holds (a mirror of the ops' forward functions; a test checks it against
# the executor): "in" its first input, "ins" all inputs, "out" its output, "act_out" the output only with a fused
# activation. Ops not listed are counted as holding their inputs and outputs.
HELD = {"conv2d": ("in", "act_out"), "dense": ("in", "act_out"), "batchnorm": ("in",), "relu": ("out",),
        "relu6": ("out",), "clip": ("out",), "sigmoid": ("out",), "tanh": ("out",), "swish": ("in",),
        "hard_sigmoid": ("in",), "hard_swish": ("in",), "maxpool": ("in",), "avgpool": (), "global_avgpool": (),
        "add": (), "mul": ("ins",), "scale": ("in",), "softmax": ("out",), "lrn": ("in",), "dropout": (),
        "concat": (), "pad": (), "reshape": (), "flatten": (), "identity": (), "transpose": (),
        "slice": (), "layer_norm": ("in",), "erf": ("in",), "gelu": ("in",), "sqrt": ("out",), "pow": ("in",),
        "reciprocal": ("out",), "neg": (), "sub": (), "div": ("in1", "out"), "reduce_mean": (), "reduce_sum": (),
        "fake_quant": ("in",)}


def held_tensors(node):
    """The tensors a node's backward reads, kept from its forward pass until then."""
    rule = HELD.get(node.op, ("ins", "out"))
    if node.op == "leaky_relu":
        rule = ("out",) if float(node.attrs.get("alpha", 0.3)) > 0 else ("in",)
    held = []
    if "in" in rule:
        held.append(node.inputs[0])
    if "ins" in rule:
        held += list(node.inputs)
    if "in1" in rule and len(node.inputs) > 1:
        held.append(node.inputs[1])
    if "out" in rule or ("act_out" in rule and node.attrs.get("act") not in (None, "linear")):
        held += list(node.outputs)
    return held


class _PoolModel:
    """The runtime's buffer pool replayed on sizes (its reuse rule `runtime.pool_fit`; buffers are kept, never
    returned), to count the device memory it ends up holding."""

    def __init__(self):
        self.free, self.allocated = {}, 0

    def take(self, size):
        from .runtime import pool_fit

        size = max(int(size), 4)
        k = pool_fit([k for k, v in self.free.items() if v], size)
        if k is not None:
            self.free[k] -= 1
            return k
        self.allocated += size
        return size

    def give(self, cap):
        self.free[cap] = self.free.get(cap, 0) + 1


def estimate_memory(plan, batch):
    """Bytes for parameters, optimizer state, gradients and activations of one training step, following what the
    executor keeps: each tensor a backward reads (`held_tensors`) from its production until that backward has run
    (at half size with precision: fp16), the other tensors from production to their last forward reader, GEMM
    scratch of a convolution's largest tensor, and in the backward pass each node's input gradients and a temporary;
    replayed through the buffer pool's reuse rule, so the figure is what the pool holds at the end of a step."""
    from .executor import grad_region
    from .ops.shapes import infer_shapes

    g = plan.suffix if plan.use_cache else plan.exec_graph
    shapes = infer_shapes(g)
    params = sum(int(np.prod(v.shape)) for n in g.param_nodes() for v in n.params.values()) * 4
    train_params = sum(int(np.prod(v.shape)) for n in g.param_nodes() if n.name in plan.trainable
                       for v in n.params.values()) * 4

    def nbytes(t):
        return int(np.prod(shapes[t])) * 4 * batch

    grad_nodes, grad_t = grad_region(g, plan.trainable)
    held_by = {}  # tensor -> index (in grad_nodes) of the earliest node whose backward reads it
    for i, n in enumerate(grad_nodes):
        for t in held_tensors(n):
            held_by[t] = min(held_by.get(t, i), i)
    last_use = {}
    for i, n in enumerate(g.nodes):
        for t in n.inputs:
            last_use[t] = i
    pool = _PoolModel()
    live = {t: pool.take(nbytes(t)) for t in g.inputs}  # tensor -> buffer size it holds
    kept = {}
    for i, n in enumerate(g.nodes):
        for t in n.outputs:
            live[t] = pool.take(nbytes(t))
        if n.op in ("conv2d", "dense"):  # GEMM scratch: running sums between k chunks (about its output)
            pool.give(pool.take(nbytes(n.outputs[0])))
        for t in list(n.inputs) + list(n.outputs):
            if t in live and last_use.get(t, -1) <= i and t not in g.outputs:
                cap = live.pop(t)
                if t in held_by and not plan.half_saved:
                    kept[t] = cap  # the same buffer stays taken until the backward
                    continue
                pool.give(cap)
                if t in held_by:  # stored as half: a new half-size buffer (Runtime.to_half)
                    kept[t] = pool.take(nbytes(t) // 2)
    grads = {t: pool.take(nbytes(t)) for t in g.outputs if t in grad_t}
    for i in range(len(grad_nodes) - 1, -1, -1):
        n = grad_nodes[i]
        restored = []
        if plan.half_saved:  # held tensors come back to float for this backward
            restored = [pool.take(nbytes(t)) for t, j in held_by.items() if j == i and t in kept]
        gin = [t for t in n.inputs if t in grad_t or t in g.inputs]
        ins = [pool.take(nbytes(t)) for t in gin]
        # GEMM panels of the input and of the output gradient
        tmp = [pool.take(max(nbytes(t) for t in n.inputs))] + [pool.take(b) for b in _gemm_scratch(n, nbytes)]
        for cap in tmp + restored:
            pool.give(cap)
        for t in n.outputs:
            if t in grads:
                pool.give(grads.pop(t))
        for t, cap in zip(gin, ins):
            if t in grads:
                pool.give(cap)  # summed into the existing gradient (fan-out)
            else:
                grads[t] = cap
        for t, j in held_by.items():
            if j == i and t in kept:
                pool.give(kept.pop(t))
    acts = pool.allocated
    # GEMM panels of frozen weights, and the weights a convolution carrying a BatchNorm folds it into (kept from its
    # forward to its backward)
    packed = packed_weight_bytes(g, plan.trainable) + sum(
        int(np.prod(n.params["weight"].shape)) * 4 for n in grad_nodes if n.attrs.get("bn"))
    total = params + packed + 3 * train_params + acts
    return {"params": params, "packed_weights": packed, "optimizer_and_grads": 3 * train_params, "activations": acts,
            "total": total}


def _gemm_scratch(n, nbytes):
    """Sizes of the temporaries a node's backward holds besides its input gradients: for a convolution or Dense the
    output gradient as a GEMM panel (columns padded to the CPU blocks' 32), that gradient masked by a fused
    activation, and a KxK convolution's im2col rows; for other nodes one tensor of the output's size."""
    out = nbytes(n.outputs[0])
    if n.op not in ("conv2d", "dense") or "weight" not in n.params:
        return [out]
    w = n.params["weight"].shape
    cout = int(w[-1])
    sizes = [out // max(cout, 1) * (-(-cout // 32) * 32)]
    if n.attrs.get("act"):
        sizes.append(out)
    if n.op == "conv2d" and len(w) == 4 and w[0] * w[1] > 1 and w[2] > 1:  # not depthwise (one input per group)
        sizes.append(out // max(cout, 1) * int(w[0] * w[1] * w[2]))
    return sizes


def packed_weight_bytes(graph, trainable):
    """An upper bound on the GEMM panels the OpenCL backend keeps for frozen weights (Backend.const_cache): one
    copy of each frozen conv (not depthwise) and dense weight up to its size limit, columns padded to 64."""
    from .backends import Backend

    total = 0
    for n in graph.nodes:
        w = n.params.get("weight")
        if (n.op not in ("conv2d", "dense") or n.name in trainable or w is None
                or w.nbytes > Backend.CONST_CACHE_MAX_BYTES
                or (n.op == "conv2d" and int(n.attrs.get("groups", 1)) > 1)):
            continue
        cols = w.shape[-1]
        total += w.nbytes // cols * (-(-cols // 64) * 64)
    return total
