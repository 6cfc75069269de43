"""The YAML recipe: schema, defaults, validation and CLI overrides.

Every error names the key, what was wrong, and the closest valid name; paths are resolved relative to the recipe.
"""
import copy
import io
import math
import os
import re

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
        "strict": ("bool", False),
    },
    "augment": {
        "hflip": ("bool", False),
        "random_resized_crop": ("range_or_null", None),
        "brightness": ("fraction", 0.0),
        "contrast": ("fraction", 0.0),
    },
    "train": {
        "epochs": ("posint", 10),
        "batch_size": ("posint", 32),
        "optimizer": ("choice:sgd,momentum,nesterov,adam,adamw", "sgd"),
        "lr": ("posnumber", 0.01),
        "momentum": ("fraction", 0.9),
        "schedule": ("choice:constant,step,cosine,warmup", "constant"),
        "step_size": ("posint", 30),
        "gamma": ("posnumber", 0.1),
        "warmup_epochs": ("int", 0),
        "weight_decay": ("nonneg", 0.0),
        "label_smoothing": ("fraction", 0.0),
        "class_weights": ("class_weights", None),
        "early_stopping": ("early_stopping", None),
        "clip_grad_norm": ("posnumber_or_null", None),
        "seed": ("int", 0),
        "cache": ("choice:auto,off", "auto"),
        "max_memory_mb": ("posnumber_or_null", None),
        "batchnorm": ("batchnorm", "inference"),
    },
    "device": ("str_or_null", None),
    "precision": ("choice:fp32,fp16", "fp32"),
    "output": ("path", "runs/{recipe}"),
    # `tcl federate server/client` (README "Federated fine-tuning"); `tcl finetune` does not read this section.
    "federated": {
        "rounds": ("posint", 10),
        "local_epochs": ("posint", 1),
        "strategy": ("choice:fedavg,fedprox,fedadam", "fedavg"),
        "fraction_fit": ("posshare", 1.0),
        "fraction_evaluate": ("share", 1.0),
        "min_clients": ("posint", 2),
        "start_clients": ("posint_or_null", None),
        "proximal_mu": ("nonneg", 0.01),
        "server_lr": ("posnumber", 0.001),
        "server_data": ("path_or_null", None),
        "classes": ("strlist", []),
        "round_timeout": ("posnumber_or_null", 1800.0),
        "client_wait": ("posnumber", 600.0),
    },
}

HEAD_LAYERS = ("global_avg_pool", "flatten", "dropout", "dense", "relu", "relu6", "batchnorm")


def _err(key, msg, fix=None):
    return RecipeError(f"Recipe key '{key}': {msg}", fix or "See the README section 'Recipe keys'.")


# A number YAML 1.1 reads as text: PyYAML needs a dot in a float (`1.0e-3`), so `1e-3`, `5E-4` and `+1e-2` arrive
# as strings. Those (and only number-shaped strings, never words) are accepted wherever a number is.
_FLOAT_TEXT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _as_number(key, v, what="a number"):
    """v as a finite float; number-shaped text ('1e-3') is accepted; anything else is a RecipeError."""
    if isinstance(v, str) and _FLOAT_TEXT.match(v.strip()):
        v = float(v.strip())
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _err(key, f"expected {what}, got {v!r}.")
    v = float(v)
    if not math.isfinite(v):
        raise _err(key, f"expected a finite number, got {v} (.nan and .inf are not usable values).",
                   "Write an ordinary number such as 0.5 or 1.0e-3.")
    return v


def _is_number(v):
    try:
        _as_number("", v)
        return True
    except RecipeError:
        return False


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
    if kind == "posint_or_null" and v is None:
        return v
    if kind == "posint_or_null":
        kind = "posint"
    if kind in ("int", "posint"):
        if isinstance(v, bool) or not isinstance(v, int) or (kind == "posint" and v < 1):
            raise _err(key, f"expected a {'positive ' if kind == 'posint' else ''}whole number, got {v!r}.")
        return v
    if kind in ("share", "posshare"):
        # A share of a whole, 1 included (federated.fraction_fit: 1.0 = every connected client).
        v = _as_number(key, v)
        if not 0 <= v <= 1 or (kind == "posshare" and v == 0):
            raise _err(key, f"must be a fraction in {'(0' if kind == 'posshare' else '[0'}, 1], got {v:g}.")
        return v
    if kind in ("number", "posnumber", "fraction", "number_or_null", "nonneg", "posnumber_or_null"):
        if v is None and kind.endswith("_or_null"):
            return v
        v = _as_number(key, v)
        if kind == "nonneg" and v < 0:
            raise _err(key, f"must be 0 or more, got {v:g}.")
        if kind.startswith("posnumber") and v <= 0:
            raise _err(key, f"must be greater than 0, got {v:g}.")
        if kind == "fraction" and not 0 <= v < 1:
            raise _err(key, f"must be a fraction in [0, 1), got {v:g}.")
        return v
    if kind == "numbers":
        # input.scale/offset/mean/std: one number for every channel, or one per channel (in channel_order).
        if v is None:
            return v
        vals = v if isinstance(v, list) else [v]
        if len(vals) not in (1, 3):
            raise _err(key, f"expected one number or exactly 3 (one per channel, in channel_order), got {v!r} "
                       f"({len(vals)} values).", f"Write e.g. `{key.rsplit('.', 1)[-1]}: 0.5` or "
                       f"`{key.rsplit('.', 1)[-1]}: [0.485, 0.456, 0.406]`.")
        return [_as_number(key, x, "a number or a list of 3 numbers") for x in vals]
    if kind == "size":
        if v is None:
            return v
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return [v, v]
        if (isinstance(v, list) and len(v) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v)):
            return list(v)
        raise _err(key, f"expected a positive size in pixels like 224 or [height, width] such as [224, 224], "
                   f"got {v!r}.", f"Set `{key}` to the model's input size in pixels (both sides at least 1), "
                   "or leave it out to use the model's own.")
    if kind == "range_or_null":
        if v is None or v is False:
            return None
        if v is True:
            return [0.08, 1.0]
        if isinstance(v, list) and len(v) == 2 and all(_is_number(x) for x in v):
            lo, hi = (_as_number(key, x) for x in v)
            if 0 < lo <= hi <= 1:
                return [lo, hi]
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
            if name == "dropout":
                if not (_is_number(arg) and 0 <= _as_number(key, arg) < 1):
                    raise _err(key, f"dropout takes a rate in [0, 1), got {arg!r}.")
                arg = _as_number(key, arg)
            out.append({name: arg})
        return out
    if kind == "class_weights":
        if v is None or v == "auto":
            return v
        if isinstance(v, dict) and all(_is_number(x) for x in v.values()):
            out = {str(k): _as_number(f"{key}.{k}", x) for k, x in v.items()}
            bad = [k for k, x in out.items() if x < 0]
            if bad:
                raise _err(f"{key}.{bad[0]}", f"a class weight must be 0 or more, got {out[bad[0]]:g}.")
            return out
        raise _err(key, f"expected 'auto' or a mapping class -> weight (finite numbers), got {v!r}.")
    if kind == "batchnorm":
        # inference | batch, or {default: MODE, LAYER_OR_PATTERN: MODE, ...} for per-layer choices.
        modes = ("inference", "batch")
        if isinstance(v, str):
            v = {"default": v}
        if not isinstance(v, dict) or not v:
            raise _err(key, f"expected inference, batch, or a mapping {{default: inference, LAYER: batch}}, got {v!r}.")
        out = {}
        for layer, mode in v.items():
            if mode not in modes:
                hint = closest(mode, modes)
                raise _err(f"{key}.{layer}" if layer != "default" else key, f"'{mode}' is not inference or batch."
                           + (f" Did you mean '{hint}'?" if hint else ""))
            out[str(layer)] = mode
        out.setdefault("default", "inference")
        return out
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
            if isinstance(pat, bool):
                raise _err(key, f"patience must be a positive whole number, got {pat!r}.")
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


def _yaml_error(path, e):
    """A RecipeError for a yaml.YAMLError, naming the line and pointing the right way."""
    problem = str(getattr(e, "problem", "") or "")
    if isinstance(e, yaml.constructor.ConstructorError) and "constructor for the tag" in problem:
        tag = problem.split("tag", 1)[1].strip(" '\"")
        if tag.startswith("tag:yaml.org,2002:"):
            tag = "!!" + tag[len("tag:yaml.org,2002:"):]
        mark = e.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return RecipeError(f"The recipe '{path}' uses the YAML tag '{tag}'{where}; tags that build Python objects "
                           "(or any other custom tags) are not allowed in recipes.",
                           "Remove the `!`/`!!` tag and write a plain value: text, a number, a list or a mapping.")
    return RecipeError(f"The recipe '{path}' is not valid YAML: {' '.join(str(e).split())}",
                       "Fix the syntax at the line shown (indentation, a missing colon).")


def load_recipe(path, overrides=None):
    """Read, validate and complete a recipe file. `overrides`: {"train.epochs": 5, "device": "cpu", ...}."""
    if not os.path.exists(path):
        raise RecipeError(f"The recipe file '{path}' does not exist.", "Check the path; examples are in configs/.")
    if os.path.isdir(path):
        raise RecipeError(f"'{path}' is a folder, not a recipe file.",
                          "Pass the recipe's .yaml file; examples are in configs/.")
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise RecipeError(f"The recipe '{path}' is not UTF-8 text (byte 0x{data[e.start]:02x} at line {line} is not "
                          "valid UTF-8; the file was probably saved as Latin-1/Windows-1252).",
                          "Save the recipe as UTF-8 in your editor (or convert it, e.g. "
                          "`iconv -f latin1 -t utf-8 old.yaml > new.yaml`).") from None
    try:
        stream = io.StringIO(text)
        stream.name = path  # PyYAML names the file in its messages
        raw = yaml.safe_load(stream)
    except yaml.YAMLError as e:
        raise _yaml_error(path, e) from e
    return recipe_from_dict(raw, base_dir=os.path.dirname(os.path.abspath(path)), path=path,
                            overrides=overrides)


def recipe_from_dict(raw, base_dir=".", path=None, overrides=None):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        where = f"The recipe '{path}'" if path else "The recipe"
        raise RecipeError(f"{where} is not a mapping of keys (it holds {type(raw).__name__} {raw!r:.60}).",
                          "Write `key: value` lines, e.g. `model: model.h5` and `data: {root: images}`; examples "
                          "are in configs/.")
    raw = copy.deepcopy(raw)
    # `data: FOLDER` is shorthand for `data: {root: FOLDER}`.
    if isinstance(raw.get("data"), str):
        raw["data"] = {"root": raw["data"]}
    for key, val in (overrides or {}).items():
        if val is None:
            continue
        d = raw
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            if d.get(part) is None:
                d[part] = {}
            elif not isinstance(d[part], dict):
                section = ".".join(parts[:i + 1])
                raise _err(section, f"expected a mapping of keys, got {d[part]!r}; the command-line option "
                           f"for '{key}' cannot be applied to it.",
                           f"Write the section as a mapping, e.g. `{section}: {{{parts[i + 1]}: ...}}`.")
            d = d[part]
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
    inp = r["input"]
    if (inp["mean"] is None) != (inp["std"] is None):
        raise RecipeError("Recipe key 'input': give both mean and std, or neither.",
                          "For ImageNet-style models: mean [0.485, 0.456, 0.406], std [0.229, 0.224, 0.225].")
    if inp["std"] is not None and min(inp["std"]) <= 0:
        raise _err("input.std", f"every std must be greater than 0 (pixels are divided by it), got {inp['std']}.",
                   "Use the standard deviations the model was trained with, e.g. [0.229, 0.224, 0.225].")
    if inp["scale"] is not None and 0 in inp["scale"]:
        raise _err("input.scale", f"a scale of 0 turns every pixel into the same value, got {inp['scale']}.",
                   "Use the model's scaling, e.g. `scale: 0.00784313725` (1/127.5) with `offset: -1`, or leave "
                   "it out to use the model's own.")
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
