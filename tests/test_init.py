"""`tcl init` (a commented starting recipe from a data folder and a model) and `tcl inspect --cut-points`."""
import json
import os

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from transfercl_cli import init_recipe as ir
from transfercl_cli.cli import main
from transfercl_cli.graph import Graph, Node
from transfercl_cli.recipe import load_recipe
from transfercl_cli.runfile import save_run_model

from .helpers import tiny_mobilenet
from .test_train import SAMPLE, make_subset

MODEL = os.path.join(SAMPLE, "models", "mobilenet_v1_1.0_224.h5")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("TCL_FEATURE_CACHE", str(tmp_path / "fc"))
    model = tmp_path / "tiny_model"
    os.makedirs(model)
    save_run_model(tiny_mobilenet(size=16), str(model))
    data = make_subset(str(tmp_path / "data"), 10)
    return model, data


def test_init_writes_a_recipe_that_dry_runs(tiny, tmp_path, rt):
    model, data = tiny
    out = tmp_path / "recipes" / "r.yaml"
    os.makedirs(out.parent)
    r = invoke("init", data, "--model", model, "-o", out, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert f"wrote {out}" in r.output and "the new head only" in r.output and "--dry-run" in r.output
    text = out.read_text()
    raw = yaml.safe_load(text)
    assert raw["model"] == "../tiny_model" and raw["data"]["root"] == "../data"  # relative to the recipe
    assert raw["cut_after"] == "conv_pw_2_relu" and raw["head"] == ["global_avg_pool", {"dense": "auto"}]
    assert raw["freeze"] == "all" and raw["unfreeze"] == []  # 7 training images per class: head only
    assert raw["data"]["val"] == 0.1 and raw["data"]["test"] == 0.2 and raw["train"]["early_stopping"] == 5
    assert raw["input"] == {"size": [16, 16], "scale": pytest.approx(1 / 127.5), "offset": -1.0}  # the model's
    assert raw["train"]["batch_size"] == 8  # 32 halved to no more than the 14 training images
    for words in ("Rule: with fewer than 100 training images per class", "records how it was trained",
                  "cat 10, dog 10", "Image sizes: all 32x32"):
        assert words in " ".join(text.split()), words
    rec = load_recipe(str(out))
    assert rec["cut_after"] == "conv_pw_2_relu" and os.path.isdir(rec["data"]["root"])
    r = invoke("finetune", out, "--dry-run")
    assert r.exit_code == 0, r.output
    assert "cut        after conv_pw_2_relu" in r.output and "train 14, val 2, test 4" in r.output
    # never replaces a recipe silently
    r = CliRunner().invoke(main, ["init", str(data), "--model", str(model), "-o", str(out)])
    assert r.exit_code == 2 and "already exists" in r.output and "--force" in r.output
    assert out.read_text() == text
    r = invoke("init", data, "--model", model, "-o", out, "--force", "--json")
    assert r.exit_code == 0 and json.loads(r.output)["cut_after"] == "conv_pw_2_relu"


def test_init_rules_more_data_split_folders_unreadable_and_budget(tiny, tmp_path, monkeypatch, rt):
    model, data = tiny
    monkeypatch.setattr(ir, "FEW_IMAGES_PER_CLASS", 5)  # 7 per class is "more" now: the last block trains
    import transfercl_cli.train as train

    monkeypatch.setattr(train, "memory_budget", lambda mb, be: 1)  # nothing fits: the smallest batch
    # split folders (no val/): val carved from train, no test fraction
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            os.makedirs(tmp_path / "split" / split / c)
    for c in ("cat", "dog"):
        files = sorted(os.listdir(os.path.join(data, c)))
        for i, f in enumerate(files):
            dst = tmp_path / "split" / ("test" if i < 2 else "train") / c / f
            dst.write_bytes(open(os.path.join(data, c, f), "rb").read())
    (tmp_path / "split" / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "r.yaml"
    s = ir.init_recipe(str(tmp_path / "split"), str(model), str(out))
    raw = yaml.safe_load(out.read_text())
    assert raw["unfreeze"] == ["conv_pw_2", "conv_pw_2_bn"] and not s["head_only"]
    assert raw["data"] == {"root": "split", "seed": 0, "val": 0.1}
    assert raw["train"]["batch_size"] == 1 and s["memory_bytes"] > s["budget_bytes"]
    text = " ".join(out.read_text().split())
    assert "1 file(s) cannot be read" in text and "broken.jpg" in text
    assert "train/ val/ test/ sub-folders are used as they are" in text
    assert s["splits"]["test"] == 4 and s["unreadable"][0]["path"].endswith("broken.jpg")
    load_recipe(str(out))


def test_init_real_mobilenet(tmp_path, rt):
    pytest.importorskip("h5py")
    out = tmp_path / "dogs_cats.yaml"
    s = ir.init_recipe(os.path.join(SAMPLE, "dogs-cats"), MODEL, str(out), device="cpu")
    raw = yaml.safe_load(out.read_text())
    # the choices of configs/sample_dogs_cats.yaml, found from the data and the model alone
    assert raw["cut_after"] == "conv_pw_13_relu" and raw["unfreeze"] == ["conv_pw_13", "conv_pw_13_bn"]
    assert raw["input"] == {"size": [224, 224], "scale": 0.00784313725, "offset": -1.0}
    assert "A GUESS TO CHECK" in out.read_text()
    assert s["splits"] == {"train": 210, "val": 30, "test": 60} and raw["train"]["batch_size"] == 32


def test_guess_preprocess_by_what_the_model_says():
    g = tiny_mobilenet()
    for meta, want in (({"format": "onnx", "producer": "pytorch"}, {"mean", "std"}),
                       ({"format": "onnx", "producer": "tf2onnx"}, {"scale", "offset"}),
                       ({"format": "keras_h5"}, {"scale", "offset"}),
                       ({"format": "keras_h5", "preprocess": {"size": (9, 9), "scale": 1 / 255, "offset": 0.0,
                                                              "in_model": True}}, {"scale", "offset"})):
        g.meta = meta
        keys, notes = ir.guess_preprocess(g)
        assert set(keys) == want, meta
        assert ("GUESS" in notes[0]) == ("preprocess" not in meta)
    assert keys == {"scale": 1, "offset": 0}  # the model rescales inside: raw pixels


def _residual_net(rng=np.random.default_rng(0)):
    """conv a -> relu r0 -> [conv b -> bn -> relu r1 -> conv c] + r0 -> add -> relu r2 -> pool -> dense -> softmax."""
    def conv(name, x, cin, cout, stride=1):
        return Node(name, "conv2d", [x], [name], {"kernel": (3, 3), "strides": (stride, stride), "dilations": (1, 1),
                                                  "pads": (1, 1, 1, 1), "groups": 1},
                    {"weight": rng.normal(0, 0.3, (3, 3, cin, cout)).astype(np.float32)}, "Conv")

    c = 8
    nodes = [conv("Conv__1", "input", 3, c, 2), Node("r0", "relu", ["Conv__1"], ["r0"]),
             conv("Conv__2", "r0", c, c),
             Node("bn", "batchnorm", ["Conv__2"], ["bn"], {"eps": 1e-3},
                  {k: np.ones(c, np.float32) for k in ("gamma", "var")} | {k: np.zeros(c, np.float32)
                                                                           for k in ("beta", "mean")}),
             Node("r1", "relu", ["bn"], ["r1"]), conv("Conv__3", "r1", c, c),
             Node("add", "add", ["Conv__3", "r0"], ["add"]), Node("r2", "relu", ["add"], ["r2"]),
             Node("pool", "reduce_mean", ["r2"], ["pool"], {"axes": [1, 2], "keepdims": False}),
             Node("fc", "dense", ["pool"], ["fc"], {}, {"weight": rng.normal(0, 0.3, (c, 5)).astype(np.float32)}),
             Node("prob", "softmax", ["fc"], ["prob"], {"axis": -1})]
    return Graph(nodes, {"input": (8, 8, 3)}, ["prob"], "res", {"format": "onnx"})


def test_graph_analysis_on_a_residual_net():
    g = _residual_net()
    assert ir.classifier_cut(g)[0] == "r2"  # the pool is a ReduceMean over height and width
    names = g.names()
    assert [names[i] for i in ir.articulation(g)] == ["Conv__1", "r0", "add", "r2", "pool", "fc", "prob"]
    assert ir.last_block(g, "r2") == ["Conv__2", "bn", "Conv__3"]  # the whole residual block
    pts = ir.cut_points(g)
    assert [p["name"] for p in pts] == ["r2", "r0"]
    assert "the usual cut" in pts[0]["why"] and "end of residual block 1 of 1" in pts[0]["why"]
    assert pts[0]["position"] == 8 and pts[0]["output_shape"] == [4, 4, 8]
    assert pts[0]["block_layers"] == ["Conv__2", "bn", "Conv__3"] and pts[1]["block_layers"] == ["Conv__1"]
    # no pool: the input of the last dense layer (through dropout/flatten); neither: no cut
    mlp = Graph([Node("flat", "flatten", ["input"], ["flat"]),
                 Node("fc1", "dense", ["flat"], ["fc1"], {}, {"weight": np.zeros((12, 4), np.float32)}),
                 Node("act", "relu", ["fc1"], ["act"]), Node("drop", "dropout", ["act"], ["drop"], {"rate": 0.5}),
                 Node("fc2", "dense", ["drop"], ["fc2"], {}, {"weight": np.zeros((4, 2), np.float32)})],
                {"input": (2, 2, 3)}, ["fc2"])
    assert ir.classifier_cut(mlp)[0] == "act" and ir.last_block(mlp, "act") == ["fc1"]
    plain = Graph([Node("a", "relu", ["input"], ["a"])], {"input": (2, 2, 3)}, ["a"])
    assert ir.classifier_cut(plain)[0] is None


def test_choose_batch_halves_to_the_budget(rt):
    from transfercl_cli.plan import build_plan, estimate_memory
    from transfercl_cli.recipe import recipe_from_dict

    rec = recipe_from_dict({"model": "m", "data": "d", "cut_after": "conv_pw_2_relu", "unfreeze": ["conv_pw_2*"],
                            "train": {"cache": "off"}})
    plan = build_plan(tiny_mobilenet(size=32), rec, ["a", "b"])
    need8 = estimate_memory(plan, 8)["total"]
    assert ir.choose_batch(plan, need8, 1000) == (8, need8)
    assert ir.choose_batch(plan, 10**12, 1000)[0] == 32 and ir.choose_batch(plan, 10**12, 5)[0] == 4


def test_inspect_cut_points_cli(tiny):
    model, _ = tiny
    r = invoke("inspect", model, "--cut-points")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert "cut points" in lines[0] and lines[2].split()[:2] == ["#15", "conv_pw_2_relu"]
    assert "the usual cut" in lines[2] and "block layers: conv_pw_2, conv_pw_2_bn" in lines[2]
    data = json.loads(invoke("inspect", model, "--cut-points", "--json").output)
    assert data["cut_points"][0]["name"] == "conv_pw_2_relu" and data["layers"] == 18
    assert {p["name"] for p in data["cut_points"]} >= {"conv_pw_2_relu", "conv_pw_1_relu"}
