import os

import pytest

from transfercl_cli.errors import RecipeError
from transfercl_cli.recipe import load_recipe, recipe_from_dict

BASE = {"model": "m.h5", "data": {"root": "imgs"}}


def rec(**kw):
    d = dict(BASE)
    d.update(kw)
    return recipe_from_dict(d, base_dir="/base", path="/base/r.yaml")


def test_defaults_and_relative_paths():
    r = rec()
    assert r["model"] == "/base/m.h5" and r["data"]["root"] == "/base/imgs"
    assert r["output"] == "/base/runs/r"
    assert r["train"]["optimizer"] == "sgd" and r["freeze"] == "all"
    assert r["head"] == [{"global_avg_pool": None}, {"dense": "auto"}]


@pytest.mark.parametrize("raw,needle", [
    ({"modle": "x"}, "Did you mean 'model'"),
    ({"train": {"epocs": 3}}, "Did you mean 'train.epochs'"),
    ({"train": {"epochs": "ten"}}, "train.epochs"),
    ({"train": {"epochs": 0}}, "positive"),
    ({"train": {"lr": -1}}, "greater than 0"),
    ({"train": {"optimizer": "adamm"}}, "Did you mean 'adam'"),
    ({"head": ["global_avg_pool", {"dens": "auto"}]}, "Did you mean 'dense'"),
    ({"head": [{"dense": "many"}]}, "dense takes"),
    ({"head": [{"dropout": 1.5}]}, "dropout takes"),
    ({"freeze": {"untill": "x"}}, "until"),
    ({"data": {"root": "x", "test": 1.2}}, "fraction"),
    ({"data": {"root": "x", "val": 0.5, "test": 0.5}}, "leave images"),
    ({"input": {"size": "big"}}, "input.size"),
    ({"augment": {"hflip": "yes"}}, "augment.hflip"),
    ({"train": {"early_stopping": {"patience": 0}}}, "patience"),
    ({"train": {"class_weights": "balanced"}}, "class_weights"),
])
def test_errors_name_the_key(raw, needle):
    with pytest.raises(RecipeError) as e:
        rec(**raw)
    assert needle in str(e.value)


def test_missing_model_and_data():
    with pytest.raises(RecipeError, match="model"):
        recipe_from_dict({"data": {"root": "x"}})
    with pytest.raises(RecipeError, match="data.root"):
        recipe_from_dict({"model": "x"})


def test_overrides_win():
    r = recipe_from_dict(BASE, overrides={"train.epochs": 7, "device": "cpu", "train.lr": None})
    assert r["train"]["epochs"] == 7 and r["device"] == "cpu" and r["train"]["lr"] == 0.01


def test_override_types_are_validated():
    with pytest.raises(RecipeError):
        recipe_from_dict(BASE, overrides={"train.batch_size": -3})


def test_yaml_file_and_syntax_error(tmp_path):
    p = tmp_path / "a.yaml"
    p.write_text("model: net.onnx\ndata:\n  root: pics\ntrain: {epochs: 2, early_stopping: 3}\n")
    r = load_recipe(str(p))
    assert r["model"] == os.path.join(str(tmp_path), "net.onnx")
    assert r["train"]["early_stopping"] == {"patience": 3, "metric": "val_accuracy"}
    bad = tmp_path / "b.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(str(bad))


def test_safe_load_rejects_python_objects(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("model: !!python/object/apply:os.system ['echo pwned']\ndata: {root: x}\n")
    with pytest.raises(RecipeError, match="not allowed in recipes"):
        load_recipe(str(p))


def test_example_configs_validate():
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    for f in os.listdir(root):
        if f.endswith(".yaml"):
            r = load_recipe(os.path.join(root, f))
            assert r["cut_after"] == "conv_pw_13_relu"
