"""The Python face of tcl: what the CLI does, as calls (the CLI, bench/ and users share it).

    import transfercl_cli as tcl

    model = tcl.load_model("mobilenet_v1.h5")                 # .h5, .onnx, an npz export or a run directory
    model.predict(["cat.jpg"], labels=["...", ...], top=3)     # paths, or a float32 NHWC array of inputs
    recipe = tcl.load_recipe({"model": "mobilenet_v1.h5", "cut_after": "conv_pw_13_relu", "unfreeze": ["conv_pw_13"],
                         "data": "photos/", "train": {"epochs": 10}}, base_dir=".")
    result = tcl.finetune(recipe, callbacks=tcl.default_callbacks_for(recipe) + [MyCallback()])
    tcl.evaluate_model(result["run_dir"])                     # metrics, meta
    tcl.export_weights(result["run_dir"], "onnx")             # {"path": ...}

(The names differ from the modules recipe.py, evaluate.py and export.py, which stay importable.)

Errors are `transfercl_cli.errors.TclError` with a message and a fix; notes are `TclNote` warnings.
"""
import os

import numpy as np

from .errors import TclError


class Model:
    """A model graph with its class names and preprocessing, run on one device."""

    def __init__(self, graph, device=None):
        self.graph = graph
        self.device = device
        self._predictor = None

    @property
    def classes(self):
        return list(self.graph.meta.get("classes") or [])

    @property
    def layers(self):
        """Layer names in order, as recipes name them (cut_after, freeze, unfreeze)."""
        return self.graph.names()

    def preprocess(self, overrides=None):
        """The Preprocess (image -> model input) this model uses, optionally with recipe-style `input` keys."""
        from .session import resolve_preprocess

        return resolve_preprocess(overrides or {}, self.graph)

    def probabilities(self, x):
        """Class probabilities for a float32 batch of model inputs (N, H, W, 3), preprocessed already."""
        from .evaluate import Predictor

        if self._predictor is None:
            self._predictor = Predictor(self.graph, self.device)
        return self._predictor.probs(np.ascontiguousarray(x, dtype=np.float32))

    def predict(self, images, top=5, labels=None, preprocess=None):
        """Top-`top` classes of each image path (list of {"image", "top": [{index, label, probability}]}), or, for
        an array of model inputs, the probabilities (N, classes)."""
        if isinstance(images, np.ndarray):
            return self.probabilities(images)
        from .evaluate import top_k

        names = list(labels) if labels is not None else self.classes
        pre = self.preprocess(preprocess)
        out = []
        for path in images:
            p = self.probabilities(pre(os.fspath(path))[None])[0]
            out.append({"image": os.fspath(path), "top": top_k(p, names, top)})
        return out


def load_model(path, device=None, **opts):
    """A Model from a Keras .h5, an ONNX file, an npz export or a tcl run directory (opts: config, input_size,
    weights='best'|'final' for run directories)."""
    from .runfile import load_any_model

    return Model(load_any_model(os.fspath(path), **opts), device)


def load_recipe(source, base_dir=".", overrides=None):
    """A validated recipe from a YAML file path or a dict (paths in a dict are relative to `base_dir`)."""
    from .recipe import load_recipe as from_file, recipe_from_dict

    if isinstance(source, dict):
        return recipe_from_dict(source, base_dir=os.path.abspath(base_dir), overrides=overrides)
    return from_file(os.fspath(source), overrides)


def default_callbacks_for(rec, quiet=True, log=print):
    """The callbacks `finetune` uses by default for a recipe (append your own to this list)."""
    from .train import default_callbacks

    return default_callbacks(rec, quiet, log)


def finetune(rec, resume=False, force=False, callbacks=None, quiet=True, log=lambda *a: None):
    """Run a recipe (from `recipe(...)`) end to end; returns {"run_dir", "metrics", "meta", "history"}."""
    from .train import finetune as run

    if not hasattr(rec, "base_dir"):
        raise TclError("finetune() takes a recipe from transfercl_cli.load_recipe(...).",
                       "Build it with load_recipe(dict_or_yaml_path).")
    return run(rec, resume=resume, quiet=quiet, log=log, force=force, callbacks=callbacks)


def evaluate_model(model, data=None, split=None, labels=None, device=None, out_dir=None, **opts):
    """(metrics, meta) of a run directory (its own split) or a model on a data folder (see `tcl evaluate`)."""
    from .evaluate import evaluate as run

    return run(os.fspath(model), data=data, split=split, device=device, labels=labels, out_dir=out_dir, **opts)


def export_weights(run_dir, fmt, output=None, int8=False, force=False, weights="best", device=None,
                   int8_activations=None):
    """Write a run's weights as onnx, tflite, h5 or npz (see `tcl export-weights`); returns {"path", ...}."""
    from .export_run import export_run

    return export_run(os.fspath(run_dir), fmt, output=output, int8=int8, force=force, weights=weights, device=device,
                      int8_activations=int8_activations)
