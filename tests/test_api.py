"""The Python API drives the same library as the CLI: load a model, predict on paths and arrays, build a recipe
from a dict, fine-tune with a callback of one's own, evaluate, export; and the training loop's callbacks alone."""
import os

import numpy as np
import pytest

import transfercl_cli as tcl
from transfercl_cli.callbacks import BestEpoch, Callback, DivergenceGuard, EarlyStopping, TrainingDiverged
from transfercl_cli.errors import TclError

from .test_train import SAMPLE, feature_cache, tiny_setup  # noqa: F401

MODEL = os.path.join(SAMPLE, "models", "mobilenet_v1_1.0_224.h5")


def test_load_predict_on_paths_and_arrays(rt):
    pytest.importorskip("h5py")
    m = tcl.load_model(MODEL, device="cpu")
    assert "conv_pw_13_bn" in m.layers
    labels = open(os.path.join(SAMPLE, "models", "imagenet_classes.txt")).read().split("\n")[:1000]
    img = os.path.join(SAMPLE, "images", "chelsea.png")
    res = m.predict([img], labels=labels, top=3)
    assert res[0]["top"][0]["index"] == 281 and "tabby" in res[0]["top"][0]["label"]
    x = m.preprocess()(img)[None]
    p = m.predict(x)
    assert p.shape == (1, 1000) and p[0].argmax() == 281
    assert p[0, 281] == pytest.approx(res[0]["top"][0]["probability"], abs=1e-6)


class Recorder(Callback):
    def __init__(self):
        self.trained, self.ended = [], []

    def on_epoch_trained(self, fit, epoch, rec):
        self.trained.append(epoch)

    def on_epoch_end(self, fit, rec):
        self.ended.append((rec["epoch"], len(fit.progress.history)))


def test_finetune_with_a_callback_evaluate_export(tiny_setup, tmp_path):
    tmp, base = tiny_setup
    rec = tcl.load_recipe(dict(base, train=dict(base["train"], epochs=2), output=str(tmp / "api_run")), base_dir=tmp)
    rcb = Recorder()
    res = tcl.finetune(rec, callbacks=tcl.default_callbacks_for(rec) + [rcb])
    assert rcb.trained == [0, 1] and rcb.ended == [(1, 1), (2, 2)]
    assert len(res["history"]) == 2 and os.path.exists(os.path.join(res["run_dir"], "checkpoint.npz"))
    metrics, meta = tcl.evaluate_model(res["run_dir"])
    assert metrics["accuracy"] == pytest.approx(res["metrics"]["accuracy"])
    out = tcl.export_weights(res["run_dir"], "npz", output=str(tmp_path / "m.npz"))
    m = tcl.load_model(out["path"], device="cpu")
    assert m.classes == ["cat", "dog"]
    with pytest.raises(TclError, match="recipe"):
        tcl.finetune({"model": "x"})


class FakeFit:
    """Just what the callbacks read."""

    def __init__(self, history, best=None, classes=2):
        from transfercl_cli.graph import Graph, Node
        from transfercl_cli.rundir import Progress

        self.progress = Progress(history=list(history), best=best)
        self.t = {"epochs": 10, "lr": 0.1, "schedule": "constant", "warmup_epochs": 0, "gamma": 0.1}
        node = Node("d", "dense", ["x"], ["y"], {}, {"weight": np.ones((2, 2), np.float32)})
        self.trainer = type("T", (), {"graph": Graph([node], {"x": (2,)}, ["y"])})()
        self.session = type("S", (), {"plan": type("P", (), {"trainable": {"d"}, "graph": self.trainer.graph})(),
                                      "classes": ["a"] * classes})()
        self.run = type("R", (), {"path": "RUN"})()
        self.stop = False


def test_divergence_guard_alone():
    g = DivergenceGuard()
    f = FakeFit([{"epoch": 1, "train_loss": 0.7}])
    g.on_epoch_trained(f, 1, {"train_loss": 5.0})  # worse, not a runaway
    with pytest.raises(TrainingDiverged, match="rose to 700"):
        g.on_epoch_trained(f, 1, {"train_loss": 700.0})
    f.trainer.graph.nodes[0].params["weight"][0, 0] = np.inf
    with pytest.raises(TrainingDiverged, match="d/weight became non-finite"):
        g.on_epoch_trained(f, 1, {"train_loss": 0.5})


def test_best_epoch_and_early_stopping_alone():
    f = FakeFit([])
    best, es = BestEpoch("val_loss"), EarlyStopping(2, "val_loss", log=lambda m: None)
    for epoch, v in enumerate([1.0, 0.8, 0.9, 0.85], start=1):
        rec = {"epoch": epoch, "val_loss": v}
        f.progress.history.append(rec)
        best.on_epoch_end(f, rec)
        es.on_epoch_end(f, rec)
    assert f.progress.best["epoch"] == 2 and f.stop  # epochs 3 and 4 did not beat epoch 2
