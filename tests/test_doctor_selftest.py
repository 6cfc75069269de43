"""`tcl doctor --selftest` (issue 18): a small network's forward pass and one training step on a device against the
numpy reference backend, pass/fail per device."""
import json

from click.testing import CliRunner

from transfercl_cli import doctor
from transfercl_cli.cli import main


def test_network_selftest_passes_on_the_test_device(rt):
    ok, detail = doctor.network_selftest(rt)
    assert ok, detail
    assert "match the numpy reference" in detail and "training step" in detail


def test_network_selftest_names_what_differs(rt, monkeypatch):
    """A device whose GEMM is 1% off fails, and the message says which results differ and by how much."""
    from transfercl_cli.ops import cl_gemm

    real = cl_gemm.gemm
    monkeypatch.setattr(cl_gemm, "gemm", lambda *a, alpha=1.0, **kw: real(*a, alpha=alpha * 1.01, **kw))
    ok, detail = doctor.network_selftest(rt)
    assert not ok
    assert "differ from the numpy reference" in detail and "forward logits" in detail


def test_doctor_selftest_cli_reports_pass_per_device(rt):
    r = CliRunner().invoke(main, ["doctor", "--selftest", "--device", rt.info.id], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    line = next(ln for ln in r.output.splitlines() if f"selftest on {rt.info.id}" in ln)
    assert line.startswith("[ok]") and "PASS" in line


def test_doctor_selftest_failure_is_a_failed_verdict(rt, monkeypatch):
    monkeypatch.setattr(doctor, "network_selftest", lambda rt: (False, "logits differ (test)"))
    r = CliRunner().invoke(main, ["doctor", "--selftest", "--device", rt.info.id, "--json"], catch_exceptions=False)
    assert r.exit_code == 2
    checks = {c["check"]: c for c in json.loads(r.stdout)}
    st = checks[f"selftest on {rt.info.id}"]
    assert not st["ok"] and st["detail"] == "FAIL: logits differ (test)" and "--device" in st["fix"]
    assert not checks["verdict"]["ok"]


def test_doctor_without_selftest_skips_the_network(rt, monkeypatch):
    monkeypatch.setattr(doctor, "network_selftest", lambda rt: (_ for _ in ()).throw(AssertionError("ran")))
    checks = doctor.run_checks(rt.info.id)
    assert not any(c.name.startswith("selftest") for c in checks) and checks[-1].ok
