"""The YAML recipe: schema, defaults, validation and CLI overrides.

Every error names the key, what was wrong, and the closest valid name; paths are resolved relative to the recipe.
"""
import copy
import os

import yaml

from .errors import RecipeError, closest

# key -> (type description, default). Nested dicts describe sub-sections.
SCHEMA = {
    "model": ("path", None),
    "model_config": ("path_or_null", None),
    "input": {
        "size": ("size", None),
        "resize": ("choice:shorter_crop,stretch", None),
        "channel_order": ("choice:RGB,BGR", None),
        "scale": ("numbers", None),
        "offset": ("numbers", None),
        "mean": ("numbers", None),
        "std": ("numbers", None),
    },
    "cut_after": ("str", None),
    "head": ("head", ["global_avg_pool", {"dense": "auto"}]),
    "freeze": ("freeze", "all"),
    "unfreeze": ("strlist", []),
    "data": {
        "root": ("path", None),
        "val": ("fraction", 0.0),
        "test": ("fraction", 0.2),
        "seed": ("int", 0),
        "extensions": ("strlist", [".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"]),
    },
    "augment": {
        "hflip": ("bool", False),
        "random_resized_crop": ("range_or_null", None),
        "brightness": ("number", 0.0),
        "contrast": ("number", 0.0),
    },
    "train": {
        "epochs": ("posint", 10),
        "batch_size": ("posint", 32),
        "optimizer": ("choice:sgd,momentum,nesterov,adam,adamw", "sgd"),
        "lr": ("posnumber", 0.01),
        "momentum": ("number", 0.9),
        "schedule": ("choice:constant,step,cosine,warmup", "constant"),
        "step_size": ("posint", 30),
        "gamma": ("number", 0.1),
        "warmup_epochs": ("int", 0),
        "weight_decay": ("number", 0.0),
        "label_smoothing": ("fraction", 0.0),
        "class_weights": ("class_weights", None),
        "early_stopping": ("early_stopping", None),
        "clip_grad_norm": ("number_or_null", None),
        "seed": ("int", 0),
        "cache": ("choice:auto,off", "auto"),
        "max_memory_mb": ("number_or_null", None),
    },
    "device": ("str_or_null", None),
    "precision": ("choice:fp32,fp16", "fp32"),
    "output": ("path", "runs/{recipe}"),
}

HEAD_LAYERS = ("global_avg_pool", "flatten", "dropout", "dense", "relu", "relu6", "batchnorm")


def _err(key, msg, fix=None):
    return RecipeError(f"Recipe key '{key}': {msg}", fix or "See the README section 'Recipe keys'.")


def _check(key, kind, v):
    """Validate one value against its schema kind; returns the normalised value."""
    if kind.startswith("choice:"):
        opts = kind.split(":", 1)[1].split(",")
        if v not in opts:
            hint = closest(v, opts)
            raise _err(key, f"'{v}' is not one of {', '.join(opts)}." + (f" Did you mean '{hint}'?" if hint else ""))
        return v
    if kind in ("str",):
        if not isinstance(v, str) or not v:
            raise _err(key, f"expected a name (text), got {v!r}.")
        return v
    if kind == "str_or_null":
        if v is None:
            return v
        return str(v)
    if kind == "path_or_null" and v is None:
        return v
    if kind in ("path", "path_or_null"):
        if not isinstance(v, str) or not v:
            raise _err(key, f"expected a file or folder path, got {v!r}.")
        return v
    if kind == "bool":
        if not isinstance(v, bool):
            raise _err(key, f"expected true or false, got {v!r}.")
        return v
    if kind in ("int", "posint"):
        if isinstance(v, bool) or not isinstance(v, int) or (kind == "posint" and v < 1):
            raise _err(key, f"expected a {'positive ' if kind == 'posint' else ''}whole number, got {v!r}.")
        return v
    if kind in ("number", "posnumber", "fraction", "number_or_null"):
        if v is None and kind == "number_or_null":
            return v
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _err(key, f"expected a number, got {v!r}.")
        if kind == "posnumber" and v <= 0:
            raise _err(key, f"must be greater than 0, got {v}.")
        if kind == "fraction" and not 0 <= v < 1:
            raise _err(key, f"must be a fraction in [0, 1), got {v}.")
        return float(v)
    if kind == "numbers":
        if v is None:
            return v
        vals = v if isinstance(v, list) else [v]
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vals):
            raise _err(key, f"expected a number or a list of 3 numbers, got {v!r}.")
        return [float(x) for x in vals]
    if kind == "size":
        if v is None:
            return v
        if isinstance(v, int) and not isinstance(v, bool):
            return [v, v]
        if isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and x > 0 for x in v):
            return list(v)
        raise _err(key, f"expected a size like 224 or [224, 224], got {v!r}.")
    if kind == "range_or_null":
        if v is None or v is False:
            return None
        if v is True:
            return [0.08, 1.0]
        if isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v) and 0 < v[0] <= v[1] <= 1:
            return [float(x) for x in v]
        raise _err(key, f"expected true, false or a scale range like [0.5, 1.0], got {v!r}.")
    if kind == "strlist":
        if v is None:
            return []
        vals = v if isinstance(v, list) else [v]
        if not all(isinstance(x, str) for x in vals):
            raise _err(key, f"expected a name or a list of names, got {v!r}.")
        return vals
    if kind == "freeze":
        if v in ("all", "none"):
            return v
        if isinstance(v, dict):
            if set(v) != {"until"} or not isinstance(v["until"], str):
                raise _err(key, f"expected {{until: LAYER}}, got {v!r}.")
            return dict(v)
        return _check(key, "strlist", v)
    if kind == "head":
        if not isinstance(v, list) or not v:
            raise _err(key, f"expected a list of layers such as [global_avg_pool, {{dense: auto}}], got {v!r}.")
        out = []
        for item in v:
            if isinstance(item, str):
                name, arg = item, None
            elif isinstance(item, dict) and len(item) == 1:
                name, arg = next(iter(item.items()))
            else:
                raise _err(key, f"each head layer is a name or a one-key mapping, got {item!r}.")
            if name not in HEAD_LAYERS:
                hint = closest(name, HEAD_LAYERS)
                raise _err(key, f"unknown head layer '{name}'; known: {', '.join(HEAD_LAYERS)}."
                           + (f" Did you mean '{hint}'?" if hint else ""))
            if name == "dense" and not (arg == "auto" or (isinstance(arg, int) and arg > 0)):
                raise _err(key, f"dense takes a number of units or 'auto' (the number of classes), got {arg!r}.")
            if name == "dropout" and not (isinstance(arg, (int, float)) and 0 <= arg < 1):
                raise _err(key, f"dropout takes a rate in [0, 1), got {arg!r}.")
            out.append({name: arg})
        return out
    if kind == "class_weights":
        if v is None or v == "auto":
            return v
        if isinstance(v, dict) and all(isinstance(x, (int, float)) for x in v.values()):
            return {str(k): float(x) for k, x in v.items()}
        raise _err(key, f"expected 'auto' or a mapping class -> weight, got {v!r}.")
    if kind == "early_stopping":
        if v is None or v is False:
            return None
        if isinstance(v, int) and not isinstance(v, bool):
            v = {"patience": v}
        if isinstance(v, dict):
            unknown = set(v) - {"patience", "metric"}
            if unknown:
                raise _err(f"{key}.{sorted(unknown)[0]}", "unknown key; use patience and metric.")
            pat = v.get("patience", 10)
            metric = v.get("metric", "val_accuracy")
            if not isinstance(pat, int) or pat < 1:
                raise _err(key, f"patience must be a positive whole number, got {pat!r}.")
            if metric not in ("val_accuracy", "val_loss"):
                raise _err(key, f"metric must be val_accuracy or val_loss, got {metric!r}.")
            return {"patience": pat, "metric": metric}
        raise _err(key, f"expected a patience (number of epochs) or {{patience: N, metric: val_accuracy}}, got {v!r}.")
    raise AssertionError(kind)


def _validate(section, schema, prefix=""):
    if not isinstance(section, dict):
        raise _err(prefix.rstrip(".") or "(top)", f"expected a mapping of keys, got {section!r}.")
    out = {}
    for k in section:
        if k not in schema:
            hint = closest(k, schema)
            raise RecipeError(
                f"Unknown recipe key '{prefix}{k}'." + (f" Did you mean '{prefix}{hint}'?" if hint else "")
                + f" Valid keys here: {', '.join(schema)}.",
                "See the README section 'Recipe keys'.",
            )
    for k, spec in schema.items():
        if isinstance(spec, dict):
            out[k] = _validate(section.get(k) or {}, spec, prefix + k + ".")
        else:
            kind, default = spec
            v = section.get(k, copy.deepcopy(default))
            out[k] = v if v is None and default is None and kind not in ("size",) else _check(prefix + k, kind, v)
    return out


class Recipe(dict):
    """A validated recipe (a dict) that remembers its file, with paths resolved against the recipe's folder."""

    path = None
    base_dir = "."

    def resolve(self, p):
        if p is None:
            return None
        p = os.path.expanduser(p)
        return p if os.path.isabs(p) else os.path.normpath(os.path.join(self.base_dir, p))


def load_recipe(path, overrides=None):
    """Read, validate and complete a recipe file. `overrides`: {"train.epochs": 5, "device": "cpu", ...}."""
    if not os.path.exists(path):
        raise RecipeError(f"The recipe file '{path}' does not exist.", "Check the path; examples are in configs/.")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise RecipeError(f"The recipe '{path}' is not valid YAML: {e}".replace("\n", " "),
                          "Fix the syntax at the line shown (indentation, a missing colon).") from e
    return recipe_from_dict(raw or {}, base_dir=os.path.dirname(os.path.abspath(path)), path=path,
                            overrides=overrides)


def recipe_from_dict(raw, base_dir=".", path=None, overrides=None):
    raw = copy.deepcopy(raw)
    for key, val in (overrides or {}).items():
        if val is None:
            continue
        d = raw
        parts = key.split(".")
        for part in parts[:-1]:
            d = d.setdefault(part, {}) if isinstance(d.get(part), dict) or part not in d else d[part]
        d[parts[-1]] = val
    r = Recipe(_validate(raw, SCHEMA))
    r.path = path
    r.base_dir = base_dir
    if not r["model"]:
        raise RecipeError("The recipe has no 'model' key.", "Add `model: path/to/model.h5` (a Keras .h5, an ONNX "
                          "file, or a tcl run directory).")
    if not r["data"]["root"]:
        raise RecipeError("The recipe has no 'data.root' key.",
                          "Add `data: {root: path/to/images}` with one sub-folder per class.")
    if r["data"]["val"] + r["data"]["test"] >= 1:
        raise _err("data", "val + test fractions must leave images for training (their sum is >= 1).")
    r["model"] = r.resolve(r["model"])
    r["model_config"] = r.resolve(r["model_config"])
    r["data"]["root"] = r.resolve(r["data"]["root"])
    out = r["output"]
    if "{recipe}" in out:
        stem = os.path.splitext(os.path.basename(path))[0] if path else "run"
        out = out.replace("{recipe}", stem)
    r["output"] = r.resolve(out)
    return r
