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
    keys = {"id", "type", "global_mem_bytes", "max_work_group_size", "fp16", "fp64", "compiles"}
    assert data and keys <= set(data[0])
    assert sum(d["default"] for d in data) == 1
    assert all(d["compiles"] for d in data if d["default"])  # the default is a device that builds kernels


def test_devices_names_a_device_that_cannot_compile(rt, monkeypatch):
    from transfercl_cli import runtime

    bad = runtime.list_devices()[0].id
    monkeypatch.setattr(runtime, "compiler_error", lambda d: "error: unknown target CPU 'generic'" if d.id == bad
                        else None)
    r = run("devices")
    assert r.exit_code == 0, r.output
    assert "cannot build a kernel here" in r.output and "tcl doctor" in r.output


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


# --------------------------------------------------------------------------------------------------------------
# A newcomer's first hour (issue 17): set-up, progress, feedback

import io  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_bars_only_on_a_terminal(monkeypatch):
    from transfercl_cli.evaluate import _bar

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert _bar(10, "evaluating").disable  # a log, a pipe, a test runner: no redraws
    tty = _FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    b = _bar(10, "evaluating")
    assert not b.disable
    b.update(5)
    b.close()
    assert "evaluating" in tty.getvalue()
    assert _bar(10, "predicting", quiet=True).disable


def test_stage_bars_for_int8_export(monkeypatch):
    from transfercl_cli.cli import _StageBars

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    bars = _StageBars()
    bars("int8 sensitivity", 1, 4)
    bars.close()
    assert sys.stderr.getvalue() == ""
    tty = _FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    bars = _StageBars()
    for stage, done, total in (("calibration images", 8, 8), ("int8 sensitivity", 2, 4), ("test accuracy", 1, 2)):
        bars(stage, done, total)
    bars.close()
    out = tty.getvalue()
    assert "calibration images" in out and "2/4" in out and "layer" in out and "test accuracy" in out


def _runner():
    try:
        return CliRunner(mix_stderr=False)  # click < 8.2
    except TypeError:
        return CliRunner()  # click >= 8.2 keeps stderr apart anyway


def test_predict_and_evaluate_print_no_bar_redraws(tmp_path, rt):
    from transfercl_cli.runfile import save_run_model

    from .helpers import tiny_mobilenet
    from .test_train import make_subset

    model = tmp_path / "m"
    os.makedirs(model)
    g = tiny_mobilenet(size=16, classes=2)
    g.meta["classes"] = ["cat", "dog"]
    save_run_model(g, str(model))
    data = make_subset(str(tmp_path / "data"), 3)
    r = _runner().invoke(main, ["predict", str(model), data, "--json"])
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.stdout)) == 6 and "\r" not in r.stderr and "predicting" not in r.stderr
    r = _runner().invoke(main, ["evaluate", str(model), "--data", data, "-o", str(tmp_path / "o"), "--json"])
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["schema_version"] == 2 and doc["metrics"]["num_samples"] == 6 and "\r" not in r.stderr


def test_export_int8_reports_progress(tmp_path, monkeypatch, rt):
    import yaml

    from transfercl_cli.export_run import export_run
    from transfercl_cli.runfile import save_run_model

    from .helpers import tiny_mobilenet
    from .test_train import make_subset

    monkeypatch.setenv("TCL_FEATURE_CACHE", str(tmp_path / "fc"))
    model = tmp_path / "m"
    os.makedirs(model)
    save_run_model(tiny_mobilenet(size=16), str(model))
    rec = tmp_path / "r.yaml"
    rec.write_text(yaml.safe_dump(dict(model=str(model), cut_after="conv_pw_2_relu", data={
        "root": make_subset(str(tmp_path / "data"), 6), "test": 0.34}, input={"size": 16}, device="cpu",
        output=str(tmp_path / "run"), train={"epochs": 1, "batch_size": 4})))
    r = CliRunner().invoke(main, ["finetune", str(rec), "--quiet"])
    assert r.exit_code == 0, r.output
    seen = []
    res = export_run(str(tmp_path / "run"), "npz", int8=True, device="cpu",
                     progress=lambda stage, done, total: seen.append((stage, done, total)))
    assert res["int8"]["accuracy_int8"] is not None
    stages = [s for s, _, _ in seen]
    assert stages.index("calibration images") < stages.index("int8 sensitivity") < stages.index("test accuracy")
    assert ("calibration images", 8, 8) in seen and seen[-1] == ("test accuracy", 2, 2)
    n_layers = max(t for s, _, t in seen if s == "int8 sensitivity")
    assert ("int8 sensitivity", n_layers, n_layers) in seen and n_layers >= 5


def test_kernel_build_hint_once_on_a_terminal(monkeypatch, rt):
    import time

    from transfercl_cli import runtime

    monkeypatch.setattr(runtime, "BUILD_HINT_SECONDS", 0.02)
    monkeypatch.setitem(runtime._BUILD_HINT, "shown", False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log: nothing
    with runtime._build_hint(rt):
        time.sleep(0.15)
    assert sys.stderr.getvalue() == ""
    tty = _FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    with runtime._build_hint(rt):
        time.sleep(0.01)  # a fast build: nothing either
    time.sleep(0.05)
    assert tty.getvalue() == ""
    for _ in range(2):
        with runtime._build_hint(rt):
            time.sleep(0.15)
    lines = tty.getvalue().splitlines()
    assert lines == [f"building OpenCL kernels for {rt.info.name} (once; cached in "
                     f"{runtime._hint_cache_dir(rt)})"]  # once per process


def test_missing_h5py_message_works_from_a_clone(monkeypatch):
    from transfercl_cli.errors import ModelError
    from transfercl_cli.importers import need_h5py, need_onnx

    monkeypatch.setitem(sys.modules, "h5py", None)
    monkeypatch.setitem(sys.modules, "onnx", None)
    for fn, pkg in ((need_h5py, "h5py"), (need_onnx, "onnx")):
        with pytest.raises(ModelError) as e:
            fn()
        msg = str(e.value)
        assert "transfercl[" not in msg and f"pip install {pkg}" in msg and ".venv/bin/pip" in msg


def test_license_is_an_spdx_string():
    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    assert 'license = "MIT"' in text and '"setuptools>=77"' in text  # the string form needs setuptools 77


def _fake_tcl(path, record):
    path.write_text("#!/bin/sh\n"
                    f'echo "$0 $*" >> {record}\n'
                    'case "$1" in\n'
                    '  finetune) mkdir -p "$4" ;;\n'
                    "  evaluate) echo '{\"metrics\": {\"accuracy\": 0.75}}' ;;\n"
                    "esac\n")
    path.chmod(0o755)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_nightly_script_finds_tcl_on_path_else_in_the_clone(tmp_path):
    clone = tmp_path / "clone"
    os.makedirs(clone / "scripts")
    os.makedirs(clone / ".venv" / "bin")
    shutil.copy(os.path.join(ROOT, "scripts", "nightly-personalize.sh"), clone / "scripts")
    record = tmp_path / "calls.txt"
    _fake_tcl(clone / ".venv" / "bin" / "tcl", record)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "MIN_ACCURACY": "0.5"}
    script = str(clone / "scripts" / "nightly-personalize.sh")
    p = subprocess.run(["bash", script, "r.yaml", str(tmp_path / "runs")], env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "accuracy 0.75" in p.stdout
    calls = record.read_text().splitlines()
    assert calls[0].startswith(f"{clone}/.venv/bin/tcl finetune r.yaml --output") and len(calls) == 4
    # on PATH wins
    os.makedirs(tmp_path / "bin")
    _fake_tcl(tmp_path / "bin" / "tcl", tmp_path / "calls2.txt")
    env["PATH"] = f"{tmp_path / 'bin'}:/usr/bin:/bin"
    p = subprocess.run(["bash", script, "r.yaml", str(tmp_path / "runs2")], env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "calls2.txt").read_text().startswith(f"{tmp_path / 'bin'}/tcl finetune")
    # neither: one clear line, exit 2
    os.unlink(clone / ".venv" / "bin" / "tcl")
    env["PATH"] = "/usr/bin:/bin"
    p = subprocess.run(["bash", script, "r.yaml", str(tmp_path / "runs3")], env=env, capture_output=True, text=True)
    assert p.returncode == 2 and "tcl not found" in p.stderr


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_prints_the_path_line_and_links_tcl(tmp_path):
    p = subprocess.run(["make", "-s", "--no-print-directory", "path-hint"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0 and ". .venv/bin/activate" in p.stdout and "make install-user" in p.stdout
    if not os.path.exists(os.path.join(ROOT, ".venv", "bin", "tcl")):
        pytest.skip("no .venv here")
    bindir = tmp_path / "bin"
    # -o: never (re)install the environment from a test
    p = subprocess.run(["make", "-s", "--no-print-directory", "-o", ".venv/.installed", "install-user",
                        f"BINDIR={bindir}"], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, PATH="/usr/bin:/bin"))
    assert p.returncode == 0, p.stderr
    assert os.path.realpath(bindir / "tcl") == os.path.realpath(os.path.join(ROOT, ".venv", "bin", "tcl"))
    assert f'export PATH="{bindir}:$PATH"' in p.stdout
    assert subprocess.run([str(bindir / "tcl"), "--version"], capture_output=True).returncode == 0
    p = subprocess.run(["make", "-s", "--no-print-directory", "uninstall-user", f"BINDIR={bindir}"], cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == 0 and not os.path.lexists(bindir / "tcl")
