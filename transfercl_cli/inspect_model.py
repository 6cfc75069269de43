"""`tcl inspect`: the layer table of a model, with a recipe's frozen/trainable/cut/new marks and a memory estimate."""
import os

import numpy as np


def _fmt_int(n):
    return f"{n:,}"


def inspect_model(model, recipe=None, batch_size=32, **load_opts):
    from .ops.shapes import infer_shapes, macs
    from .runfile import load_any_model

    graph = load_any_model(model, **load_opts)
    marks = {}
    plan = None
    if recipe:
        from .plan import build_plan
        from .recipe import load_recipe

        r = load_recipe(recipe, {"train.batch_size": batch_size})
        classes = _recipe_classes(r)
        plan = build_plan(graph, r, classes)
        for n in plan.cut:
            marks[n] = "cut"
        for n in plan.graph.nodes:
            if n.name in plan.new:
                marks[n.name] = "new"
            elif n.name in plan.trainable:
                marks[n.name] = "trainable"
            elif n.params:
                marks[n.name] = "frozen"
        show = plan.graph
        extra_cut = [n for n in graph.nodes if n.name in set(plan.cut)]
    else:
        show = graph
        extra_cut = []
    shapes = infer_shapes(show)
    rows = []
    for n in list(show.nodes) + extra_cut:
        if n in extra_cut:
            out_shape, m = None, 0
        else:
            out_shape = shapes[n.outputs[0]]
            m = macs(n, [shapes[t] for t in n.inputs], out_shape)
        trained = sum(int(np.prod(v.shape)) for k, v in n.params.items() if k not in ("mean", "var"))
        rows.append({"name": n.name, "type": n.source or n.op, "op": n.op, "trained_params": trained,
                     "output_shape": list(out_shape) if out_shape is not None else None,
                     "params": n.num_params(), "macs": int(m), "status": marks.get(n.name, "")})
    total_params = sum(r["params"] for r in rows if r["status"] != "cut")
    total_macs = sum(r["macs"] for r in rows)
    # BatchNorm's moving statistics are parameters but not trained.
    trainable_params = sum(r["trained_params"] for r in rows if r["status"] in ("trainable", "new"))
    # Training memory estimate: every parameter, gradients+optimizer state for the trainable ones, and activations
    # (kept for backward from the first trainable layer on).
    if plan is not None:
        mem = plan.memory
    else:
        act = sum(int(np.prod(shapes[n.outputs[0]])) for n in show.nodes) * 4 * batch_size
        mem = {"params": total_params * 4, "optimizer_and_grads": 3 * total_params * 4, "activations": 2 * act}
        mem["total"] = sum(mem.values())
    w = max([len(r["name"]) for r in rows] + [5])
    tw = max([len(r["type"]) for r in rows] + [4])
    lines = [f"{os.path.basename(model)}: {len(rows)} layers"]
    hdr = f"{'layer':<{w}}  {'type':<{tw}}  {'output shape':<16}  {'params':>10}  {'MACs':>13}"
    if plan is not None:
        hdr += "  status"
    lines += [hdr, "-" * len(hdr)]
    for r in rows:
        shp = "-" if r["output_shape"] is None else "x".join(str(v) for v in r["output_shape"])
        line = f"{r['name']:<{w}}  {r['type']:<{tw}}  {shp:<16}  {_fmt_int(r['params']):>10}  {_fmt_int(r['macs']):>13}"
        if plan is not None:
            line += f"  {r['status']}"
        lines.append(line)
    lines.append("-" * len(hdr))
    lines.append(f"total: {_fmt_int(total_params)} parameters, {_fmt_int(total_macs)} multiply-adds per image"
                 + (f"; {_fmt_int(trainable_params)} trainable" if plan is not None else ""))
    lines.append(f"training memory estimate at batch {batch_size}: {mem['total'] / 2**20:.0f} MiB "
                 f"(parameters {mem['params'] / 2**20:.0f}, gradients+optimizer {mem['optimizer_and_grads'] / 2**20:.0f}, "
                 f"activations {mem['activations'] / 2**20:.0f})"
                 + ("" if plan is not None else " with every layer trainable"))
    if plan is not None:
        lines.append("cache: " + (f"on ({plan.cache_tensor})" if plan.use_cache else f"off ({plan.cache_reason})"))
    # What the importer made of layers that do nothing at inference (Keras augmentation layers, ...).
    lines += [f"note: {note}" for note in graph.meta.get("notes", [])]
    return {"model": model, "layers": rows, "total_params": total_params, "total_macs": total_macs,
            "trainable_params": trainable_params if plan is not None else None, "memory_bytes": mem,
            "text": "\n".join(lines)}


def _recipe_classes(r):
    from .data import recipe_splits

    return list(recipe_splits(r["data"]).classes)


def inspect_cut_points(model, **load_opts):
    """`tcl inspect MODEL --cut-points`: the places worth cutting (the input of the old classifier, the ends of the
    last blocks and residual blocks, the last block at each resolution), with positions (rows of the layer table),
    so that an opaque ONNX name like Conv__357 is a choice a person can make."""
    from .init_recipe import cut_points, cut_points_text
    from .runfile import load_any_model

    graph = load_any_model(model, **load_opts)
    points = cut_points(graph)
    return {"model": model, "layers": len(graph.nodes), "cut_points": points,
            "text": cut_points_text(os.path.basename(os.path.normpath(model)), points, len(graph.nodes))}
