"""Fine-tuning end to end: a real pretrained model on real photos, and the run mechanics (cache, resume, corrupt
images, divergence) on a tiny model so they stay fast."""
import json
import os
import shutil

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from transfercl_cli.cli import main
from transfercl_cli.errors import TclError
from transfercl_cli.recipe import load_recipe
from transfercl_cli.runfile import save_run_model
from transfercl_cli.train import finetune

from .helpers import tiny_mobilenet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "sample_data")


def make_subset(dst, per_class, offset=0):
    for c in ("cat", "dog"):
        os.makedirs(os.path.join(dst, c), exist_ok=True)
        files = sorted(os.listdir(os.path.join(SAMPLE, "dogs-cats", c)))[offset:offset + per_class]
        for f in files:
            shutil.copy(os.path.join(SAMPLE, "dogs-cats", c, f), os.path.join(dst, c, f))
    return dst


def write_recipe(path, **kw):
    with open(path, "w") as f:
        yaml.safe_dump(kw, f)
    return str(path)


@pytest.fixture
def feature_cache(tmp_path, monkeypatch):
    d = tmp_path / "featcache"
    monkeypatch.setenv("TCL_FEATURE_CACHE", str(d))
    return d


@pytest.fixture
def tiny_setup(tmp_path, feature_cache, rt):
    model_dir = tmp_path / "tiny_model"
    os.makedirs(model_dir)
    g = tiny_mobilenet(size=16)
    g.meta["classes"] = ["a", "b", "c", "d"]
    save_run_model(g, str(model_dir))
    data = make_subset(str(tmp_path / "data"), 12)
    base = dict(model=str(model_dir), cut_after="conv_pw_2_relu", freeze="all", unfreeze=["conv_pw_2*"],
                head=["global_avg_pool", {"dropout": 0.2}, {"dense": "auto"}],
                data={"root": data, "test": 0.25, "val": 0.25}, input={"size": 16},
                train={"epochs": 4, "batch_size": 5, "optimizer": "momentum", "lr": 0.05, "seed": 3}, device="cpu")
    return tmp_path, base


def run_recipe(tmp_path, base, name, resume=False, **changes):
    cfg = json.loads(json.dumps(base))
    for k, v in changes.items():
        cfg[k] = v
    cfg.setdefault("output", str(tmp_path / name))
    r = load_recipe(write_recipe(tmp_path / f"{name}.yaml", **cfg))
    return finetune(r, resume=resume, quiet=True, log=lambda *a: None)


def test_real_mobilenet_finetune_beats_chance(tmp_path, feature_cache, rt):
    """The README's job in small: ImageNet MobileNet V1 from the shipped .h5, conv_pw_13 + a new head trained on
    real dog/cat photos with the project's OpenCL kernels."""
    pytest.importorskip("h5py")
    data = make_subset(str(tmp_path / "data"), 50)
    rec = write_recipe(tmp_path / "r.yaml", model=os.path.join(SAMPLE, "models", "mobilenet_v1_1.0_224.h5"),
                       cut_after="conv_pw_13_relu", freeze="all", unfreeze=["conv_pw_13"],
                       data={"root": data, "test": 0.3}, train={"epochs": 12, "batch_size": 16, "lr": 0.003},
                       device="cpu", output=str(tmp_path / "run"))
    res = CliRunner().invoke(main, ["finetune", rec, "--quiet"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    run = tmp_path / "run"
    for f in ("model.json", "weights.npz", "best.npz", "metrics.jsonl", "report.json", "report.md",
              "confusion_matrix.png", "training_curves.png", "classes.json", "recipe.resolved.yaml"):
        assert (run / f).exists(), f
    rep = json.loads((run / "report.json").read_text())
    acc = rep["metrics"]["accuracy"] if "metrics" in rep else rep["accuracy"]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 12
    hist = [json.loads(x) for x in lines]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert acc >= 0.7, f"test accuracy {acc} after fine-tuning"


def test_cache_hit_miss_and_invalidation(tiny_setup):
    tmp_path, base = tiny_setup
    r1 = run_recipe(tmp_path, base, "c1", train=dict(base["train"], epochs=1))
    assert r1["meta"]["cache"]["misses"] == 24 and r1["meta"]["cache"]["hits"] == 0
    r2 = run_recipe(tmp_path, base, "c2", train=dict(base["train"], epochs=1))
    assert r2["meta"]["cache"]["hits"] == 24 and r2["meta"]["cache"]["misses"] == 0
    # A changed image (same name, new content) is recomputed; the others are reused.
    d = os.path.join(base["data"]["root"], "cat")
    first = sorted(os.listdir(d))[0]
    shutil.copy(os.path.join(SAMPLE, "dogs-cats", "cat", sorted(os.listdir(os.path.join(SAMPLE, "dogs-cats", "cat")))[-1]),
                os.path.join(d, first))
    r3 = run_recipe(tmp_path, base, "c3", train=dict(base["train"], epochs=1))
    assert r3["meta"]["cache"]["misses"] == 1 and r3["meta"]["cache"]["hits"] == 23
    # Different preprocessing (another cut tensor shape would too) -> another cache.
    r4 = run_recipe(tmp_path, base, "c4", input={"size": 16, "resize": "stretch"}, train=dict(base["train"], epochs=1))
    assert r4["meta"]["cache"]["misses"] == 24
    # Augmentation turns the cache off, and the plan says why.
    r5 = run_recipe(tmp_path, base, "c5", augment={"hflip": True}, train=dict(base["train"], epochs=1))
    assert r5["meta"]["cache"] is None


def test_same_seed_same_result_and_resume_equivalence(tiny_setup):
    tmp_path, base = tiny_setup
    full = run_recipe(tmp_path, base, "full")
    run_recipe(tmp_path, base, "again")
    w_full = np.load(tmp_path / "full" / "weights.npz", allow_pickle=False)
    w_again = np.load(tmp_path / "again" / "weights.npz", allow_pickle=False)
    for k in w_full.files:
        np.testing.assert_array_equal(w_full[k], w_again[k])
    run_recipe(tmp_path, base, "part", train=dict(base["train"], epochs=2), output=str(tmp_path / "resumed"))
    run_recipe(tmp_path, base, "part", resume=True, output=str(tmp_path / "resumed"))
    w_res = np.load(tmp_path / "resumed" / "weights.npz", allow_pickle=False)
    for k in w_full.files:
        np.testing.assert_allclose(w_res[k], w_full[k], rtol=1e-6, atol=1e-7, err_msg=k)
    hist = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4]
    assert full["history"][-1]["train_loss"] == pytest.approx(hist[-1]["train_loss"], rel=1e-5)


def test_resume_refuses_a_different_recipe(tiny_setup):
    tmp_path, base = tiny_setup
    run_recipe(tmp_path, base, "x", train=dict(base["train"], epochs=1), output=str(tmp_path / "rx"))
    for change in ({"optimizer": "adam"}, {"label_smoothing": 0.1}, {"seed": 4}):
        with pytest.raises(TclError, match="recipe differs"):
            run_recipe(tmp_path, base, "y", resume=True, output=str(tmp_path / "rx"),
                       train=dict(base["train"], **change))
    # The learning rate and its schedule may change (a diverged run continues with a lower rate).
    res = run_recipe(tmp_path, base, "y", resume=True, output=str(tmp_path / "rx"),
                     train=dict(base["train"], epochs=2, lr=0.01, schedule="cosine"))
    assert [h["epoch"] for h in res["history"]] == [1, 2]


def test_corrupt_image_is_skipped_and_listed(tiny_setup):
    tmp_path, base = tiny_setup
    bad = os.path.join(base["data"]["root"], "dog", "zz_corrupt.png")
    with open(bad, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n this is not really a png")
    for cache in ("auto", "off"):
        res = run_recipe(tmp_path, base, f"bad_{cache}", train=dict(base["train"], epochs=1, cache=cache))
        listed = [b["path"] for b in res["meta"]["bad_images"]]
        assert os.path.abspath(bad) in [os.path.abspath(p) for p in listed], cache
        md = (tmp_path / f"bad_{cache}" / "report.md").read_text()
        assert "zz_corrupt.png" in md


def test_divergence_stops_with_clear_error_and_keeps_checkpoint(tiny_setup, monkeypatch):
    from transfercl_cli import ops

    tmp_path, base = tiny_setup
    real = ops.lookup("opencl", "softmax_xent", "fn")
    calls = {"n": 0}

    def nan_after_epoch_one(be, logits, labels, **kw):
        loss, g = real(be, logits, labels, **kw)
        calls["n"] += 1
        # 12 training images in batches of 5: 3 steps per epoch; the loss "explodes" in epoch 2.
        return (float("nan") if calls["n"] > 3 else loss), g

    monkeypatch.setitem(ops._REGISTRY, ("opencl", "softmax_xent", "fn"), nan_after_epoch_one)
    rec = write_recipe(tmp_path / "div.yaml", **dict(base, output=str(tmp_path / "div")))
    res = CliRunner().invoke(main, ["finetune", rec, "--quiet"])
    assert res.exit_code == 2, res.output
    assert "loss became nan" in res.output and "checkpoint" in res.output and "Traceback" not in res.output
    ck = json.loads((tmp_path / "div" / "checkpoint.json").read_text())
    assert ck["epoch"] == 0  # the last good epoch (0-based) is kept
    assert (tmp_path / "div" / "checkpoint.npz").exists()


def test_dry_run_prints_plan_and_trains_nothing(tiny_setup):
    tmp_path, base = tiny_setup
    rec = write_recipe(tmp_path / "dry.yaml", **dict(base, output=str(tmp_path / "dry")))
    res = CliRunner().invoke(main, ["finetune", rec, "--dry-run"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    for word in ("trainable", "conv_pw_2", "head_dense", "cache      on", "memory", "cut"):
        assert word in res.output
    assert not (tmp_path / "dry").exists()


def test_missing_data_folder_and_bad_layer_fail_before_work(tiny_setup):
    tmp_path, base = tiny_setup
    rec = write_recipe(tmp_path / "m.yaml", **dict(base, data={"root": str(tmp_path / "nope")}))
    res = CliRunner().invoke(main, ["finetune", rec])
    assert res.exit_code == 2 and "nope" in res.output
    rec = write_recipe(tmp_path / "m2.yaml", **dict(base, unfreeze=["conv_pw_22*"]))
    res = CliRunner().invoke(main, ["finetune", rec])
    assert res.exit_code == 2 and "unfreeze" in res.output and "Did you mean" in res.output


def test_micro_batches_give_the_full_batch_result(tiny_setup):
    from transfercl_cli.plan import estimate_memory
    from transfercl_cli.train import Session

    tmp_path, base = tiny_setup
    cfg = dict(base, unfreeze=["conv_pw_2"], head=["global_avg_pool", {"dense": "auto"}],
               train=dict(base["train"], epochs=2, batch_size=6))
    full = run_recipe(tmp_path, cfg, "mb_full")
    s = Session(load_recipe(write_recipe(tmp_path / "mb_probe.yaml", **dict(cfg, output=str(tmp_path / "p")))),
                log=lambda *a: None)
    assert s.micro_batch is None
    budget_mb = (estimate_memory(s.plan, 2)["total"] + 16) / 2**20
    cfg_mb = dict(cfg, train=dict(cfg["train"], max_memory_mb=budget_mb))
    s2 = Session(load_recipe(write_recipe(tmp_path / "mb_probe2.yaml", **dict(cfg_mb, output=str(tmp_path / "p")))),
                 log=lambda *a: None)
    assert s2.micro_batch == 2
    micro = run_recipe(tmp_path, cfg_mb, "mb_micro")
    a = np.load(tmp_path / "mb_full" / "weights.npz", allow_pickle=False)
    b = np.load(tmp_path / "mb_micro" / "weights.npz", allow_pickle=False)
    for k in a.files:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert micro["history"][-1]["train_loss"] == pytest.approx(full["history"][-1]["train_loss"], rel=1e-4)
    # Not even one image fits: a clear error before any work.
    cfg_tiny = dict(cfg, train=dict(cfg["train"], max_memory_mb=1e-6))
    with pytest.raises(TclError, match="one image"):
        run_recipe(tmp_path, cfg_tiny, "mb_none")


def test_fp16_feature_cache_halves_storage_and_trains_alike(tiny_setup):
    tmp_path, base = tiny_setup
    r32 = run_recipe(tmp_path, base, "p32", train=dict(base["train"], epochs=3))
    r16 = run_recipe(tmp_path, base, "p16", precision="fp16", train=dict(base["train"], epochs=3))
    d32, d16 = r32["meta"]["cache"]["dir"], r16["meta"]["cache"]["dir"]
    assert d32 != d16
    f32 = np.fromfile(os.path.join(d32, "features.f32"), np.float32)
    f16 = np.fromfile(os.path.join(d16, "features.f16"), np.float16)
    assert f16.size == f32.size
    # Same features up to float16 rounding (relative 2^-11), so training follows the float32 run closely.
    np.testing.assert_allclose(f16.astype(np.float32), f32, rtol=1e-3, atol=1e-3 * np.abs(f32).max())
    l32 = [h["train_loss"] for h in r32["history"]]
    l16 = [h["train_loss"] for h in r16["history"]]
    np.testing.assert_allclose(l16, l32, rtol=2e-2)


def test_ctrl_c_keeps_last_epoch_and_resume_finishes(tiny_setup, monkeypatch):
    from transfercl_cli import train as train_mod

    tmp_path, base = tiny_setup
    real_step = train_mod.Trainer.step
    calls = {"n": 0}

    def interrupt_in_epoch_two(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 5:  # 3 steps per epoch: the 5th is inside epoch 2
            raise KeyboardInterrupt
        return real_step(self, *a, **kw)

    monkeypatch.setattr(train_mod.Trainer, "step", interrupt_in_epoch_two)
    rec = write_recipe(tmp_path / "int.yaml", **dict(base, output=str(tmp_path / "int")))
    res = CliRunner().invoke(main, ["finetune", rec, "--quiet"])
    assert res.exit_code == 130 and "--resume" in res.output and "Traceback" not in res.output
    assert json.loads((tmp_path / "int" / "checkpoint.json").read_text())["epoch"] == 0
    monkeypatch.setattr(train_mod.Trainer, "step", real_step)
    res = CliRunner().invoke(main, ["finetune", rec, "--quiet", "--resume"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert len((tmp_path / "int" / "metrics.jsonl").read_text().splitlines()) == 4


def test_existing_run_is_not_overwritten_without_force(tiny_setup):
    tmp_path, base = tiny_setup
    rec = write_recipe(tmp_path / "ow.yaml", **dict(base, train=dict(base["train"], epochs=1),
                                                   output=str(tmp_path / "ow")))
    assert CliRunner().invoke(main, ["finetune", rec, "-q"], catch_exceptions=False).exit_code == 0
    before = (tmp_path / "ow" / "weights.npz").read_bytes()
    res = CliRunner().invoke(main, ["finetune", rec, "-q"])
    assert res.exit_code == 2 and "--force" in res.output and "--resume" in res.output
    assert (tmp_path / "ow" / "weights.npz").read_bytes() == before
    assert CliRunner().invoke(main, ["finetune", rec, "-q", "--force"], catch_exceptions=False).exit_code == 0


def test_numpy_fallback_device_trains_with_a_warning(tiny_setup):
    tmp_path, base = tiny_setup
    with pytest.warns(RuntimeWarning, match="slower"):
        res = run_recipe(tmp_path, dict(base, device="numpy"), "np_dev", train=dict(base["train"], epochs=2))
    assert res["meta"]["device"] == "numpy" and len(res["history"]) == 2
    assert all(np.isfinite(h["train_loss"]) for h in res["history"])


def test_no_progress_bars_when_output_is_not_a_terminal(tiny_setup):
    """In a script or a log file (CliRunner's streams are not terminals) only the per-epoch lines appear: no bar
    redraws."""
    tmp_path, base = tiny_setup
    rec = write_recipe(tmp_path / "p.yaml", **dict(base, train=dict(base["train"], epochs=2),
                                                     output=str(tmp_path / "p")))
    res = CliRunner().invoke(main, ["finetune", rec], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "epoch   2/2" in res.output and "\r" not in res.output and "img/s]" not in res.output


def test_batchnorm_modes_inference_keeps_statistics_batch_updates_them(tiny_setup):
    """train.batchnorm: inference (the default) normalises a trainable pretrained BatchNorm with its moving statistics
    and leaves them as they were, while gamma/beta train; batch uses the batch's statistics and updates the moving
    ones. The plan says which mode each BatchNorm trains in; per-layer patterns override the default."""
    tmp_path, base = tiny_setup
    before = np.load(os.path.join(base["model"], "weights.npz"), allow_pickle=False)
    for mode in ("inference", "batch"):
        res = run_recipe(tmp_path, base, f"bn_{mode}", train=dict(base["train"], epochs=2, batchnorm=mode))
        after = np.load(tmp_path / f"bn_{mode}" / "weights.npz", allow_pickle=False)
        stats_same = all(np.array_equal(after[f"conv_pw_2_bn/{k}"], before[f"conv_pw_2_bn/{k}"]) for k in ("mean", "var"))
        assert stats_same == (mode == "inference"), mode
        assert not np.array_equal(after["conv_pw_2_bn/gamma"], before["conv_pw_2_bn/gamma"]), mode
        gap = res["meta"]["batchnorm_gap"]
        assert (gap is None) == (mode == "inference")
        if gap:
            assert gap["points"] == pytest.approx(100 * (gap["train_accuracy"] - gap["train_accuracy_inference_mode"]),
                                                  abs=0.01)
    rec = write_recipe(tmp_path / "bnp.yaml", **dict(base, train=dict(base["train"], batchnorm={
        "default": "inference", "conv_pw_2_b*": "batch"}), output=str(tmp_path / "bnp")))
    res = CliRunner().invoke(main, ["finetune", rec, "--dry-run"], catch_exceptions=False)
    assert "conv_pw_2_bn (batch mode)" in res.output
    rec = write_recipe(tmp_path / "bnx.yaml", **dict(base, train=dict(base["train"], batchnorm={"conv_pw_9_bn": "batch"}),
                                                      output=str(tmp_path / "bnx")))
    res = CliRunner().invoke(main, ["finetune", rec, "--dry-run"])
    assert res.exit_code == 2 and "train.batchnorm.conv_pw_9_bn" in res.output and "Did you mean" in res.output


def test_run_directory_keeps_one_copy_of_the_frozen_layers(tiny_setup):
    """frozen.npz holds the layers that never change, once; weights/best/checkpoint hold only what trained, and
    the run still loads (and exports) as the whole model."""
    from transfercl_cli.runfile import load_run_model

    tmp_path, base = tiny_setup
    run_recipe(tmp_path, base, "one", train=dict(base["train"], epochs=1))
    run = tmp_path / "one"
    spec = json.loads((run / "model.json").read_text())
    every = {f"{n['name']}/{k}" for n in spec["nodes"] for k in n["params"]}
    frozen = set(np.load(run / "frozen.npz", allow_pickle=False).files)
    trained = {"conv_pw_2/weight", "conv_pw_2_bn/gamma", "conv_pw_2_bn/beta", "conv_pw_2_bn/mean", "conv_pw_2_bn/var",
               "head_dense/weight", "head_dense/bias"}
    assert frozen == every - trained
    for f in ("weights.npz", "best.npz"):
        assert set(np.load(run / f, allow_pickle=False).files) == trained, f
    ck = set(np.load(run / "checkpoint.npz", allow_pickle=False).files)
    assert {k for k in ck if not k.startswith("__")} == trained
    g = load_run_model(str(run))
    assert set(g.params()) == every


def test_a_model_that_rescales_inside_gets_raw_pixels():
    """Keras Rescaling/Normalization layers at the input run inside the graph (meta preprocess in_model): the data
    pipeline then feeds [0, 255] pixels, never the same scaling a second time; a recipe's `input` still wins."""
    from transfercl_cli.graph import Graph
    from transfercl_cli.session import resolve_preprocess

    g = Graph([], {"x": (8, 8, 3)}, ["x"], meta={"preprocess": {"size": [8, 8], "scale": 1 / 127.5, "offset": -1.0,
                                                                 "in_model": True}})
    d = resolve_preprocess({}, g).to_dict()
    assert d["scale"] == 1.0 and d["offset"] == 0.0 and d["size"] == [8, 8]
    d = resolve_preprocess({"scale": 0.5, "offset": 0.0}, g).to_dict()
    assert d["scale"] == 0.5
    g.meta["preprocess"].pop("in_model")  # a hint for the pipeline (a tcl run's own): used as given
    assert resolve_preprocess({}, g).to_dict()["scale"] == pytest.approx(1 / 127.5)
