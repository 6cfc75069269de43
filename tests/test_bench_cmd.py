"""`tcl bench MODEL...`: warm-up, latency, throughput, training step and memory, one row per model."""
import json
import os

import pytest
from click.testing import CliRunner

from transfercl_cli.bench_models import format_rows
from transfercl_cli.cli import main
from transfercl_cli.runfile import save_run_model

from .helpers import tiny_mobilenet


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench") / "tiny_model"
    os.makedirs(d)
    save_run_model(tiny_mobilenet(size=16), str(d))
    return d


def test_bench_one_model_with_training_step(tiny_model, rt):
    r = invoke("bench", tiny_model, "--batch", "1", "4", "--runs", "2", "--train", "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    (row,) = json.loads(r.output)
    assert row["device"] == rt.info.name and row["input"] == [16, 16, 3] and row["runs"] == 2
    assert row["latency_batch"] == 1 and row["throughput_batch"] == 4
    assert row["warmup_seconds"] > 0 and row["latency_ms"] > 0 and row["images_per_sec"] > 0
    assert row["peak_rss_bytes"] > 10 * 2**20 and row["device_peak_bytes"] > 0
    t = row["train"]
    assert t["batch"] == 4 and t["step_ms"] > 0 and t["images_per_sec"] > 0
    # the typical recipe: cut before the old classifier, the last block and the new head train
    assert t["cut_after"] == "conv_pw_2_relu" and t["trainable"] == ["conv_pw_2", "conv_pw_2_bn", "head_dense"]
    text = format_rows([row])
    assert "medians of 2 runs" in text and rt.info.name in text and "train step b4" in text
    assert "tiny_model" in text.splitlines()[3]


def test_bench_several_models_each_in_its_own_process(tiny_model, tmp_path, rt):
    other = tmp_path / "other_model"
    os.makedirs(other)
    save_run_model(tiny_mobilenet(size=12, classes=3), str(other))
    r = invoke("bench", tiny_model, other, "--runs", "1", "--batch", "1", "2", "--device", "cpu")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert "each model in a process of its own" in lines[0]
    assert lines[3].startswith("tiny_model") and lines[4].startswith("other_model")
    assert "train step" not in lines[1]


def test_bench_refuses_bad_input(tiny_model, tmp_path):
    r = invoke("bench", tmp_path / "nope.h5")
    assert r.exit_code == 2 and "does not exist" in r.output
    r = invoke("bench", tiny_model, "--runs", "0")
    assert r.exit_code == 2 and "--runs" in r.output
