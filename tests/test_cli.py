import json

from click.testing import CliRunner

from transfercl_cli import __version__
from transfercl_cli.cli import main


def run(*args, **kw):
    return CliRunner().invoke(main, list(args), catch_exceptions=False, **kw)


def test_version():
    r = run("--version")
    assert r.exit_code == 0 and __version__ in r.output


def test_help_lists_commands():
    r = run("--help")
    assert r.exit_code == 0
    for cmd in ("devices", "finetune", "evaluate", "predict", "inspect", "export-weights"):
        assert cmd in r.output


def test_devices_lists_pocl(rt):
    r = run("devices")
    assert r.exit_code == 0, r.output
    assert "0:0" in r.output and "compute units" in r.output and "work-group" in r.output


def test_devices_json(rt):
    r = run("devices", "--json")
    data = json.loads(r.output)
    assert data and {"id", "type", "global_mem_bytes", "max_work_group_size", "fp16", "fp64"} <= set(data[0])
    assert sum(d["default"] for d in data) == 1


def test_bad_device_is_one_paragraph_exit_2(rt, tmp_path):
    rec = tmp_path / "r.yaml"
    rec.write_text("model: m.h5\ndata: {root: d}\n")
    r = CliRunner().invoke(main, ["predict", "--device", "nosuchdevice", "x.onnx", "y.png"])
    assert r.exit_code == 2
    assert "Traceback" not in r.output
    assert "No such" in r.output or "does not exist" in r.output or "No OpenCL device" in r.output


def test_missing_recipe_exit_2(tmp_path):
    r = CliRunner().invoke(main, ["finetune", str(tmp_path / "nope.yaml")])
    assert r.exit_code == 2 and "does not exist" in r.output and "Traceback" not in r.output


def test_unknown_recipe_key_names_closest(tmp_path):
    rec = tmp_path / "r.yaml"
    rec.write_text("model: m.h5\ndata: {root: d}\ntrain: {epocs: 3}\n")
    r = CliRunner().invoke(main, ["finetune", str(rec)])
    assert r.exit_code == 2
    assert "train.epocs" in r.output and "train.epochs" in r.output


def test_verbose_shows_traceback(tmp_path):
    rec = tmp_path / "r.yaml"
    rec.write_text("model: m.h5\ndata: {root: d}\ntrain: {epocs: 3}\n")
    r = CliRunner().invoke(main, ["--verbose", "finetune", str(rec)])
    assert r.exit_code == 2 and "Traceback" in r.output


def test_unexpected_errors_are_one_paragraph(tmp_path, monkeypatch):
    from transfercl_cli import evaluate

    def boom(*a, **k):
        raise ZeroDivisionError("synthetic")

    monkeypatch.setattr(evaluate, "predict", boom)
    r = CliRunner().invoke(main, ["predict", "m.onnx", "x.png"])
    assert r.exit_code == 1 and "Internal error" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["--verbose", "predict", "m.onnx", "x.png"])
    assert r.exit_code == 1 and "Traceback" in r.output
