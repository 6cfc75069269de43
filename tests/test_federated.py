"""`tcl federate` (federate.py): what a client sends, the checks on both ends, and a whole federation on real Flower
processes over gRPC + TLS on 127.0.0.1 (a server, four clients, one killed mid-round, one with another recipe, and
a server restart with --resume)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from transfercl_cli.cli import main
from transfercl_cli.errors import TclError
from transfercl_cli.recipe import load_recipe
from transfercl_cli.runfile import save_run_model

from .helpers import tiny_mobilenet
from .test_train import make_subset

flwr = pytest.importorskip("flwr", reason="the `federated` extra (flwr) is not installed")

from transfercl_cli import federate as fed  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model(tmp_path):
    d = tmp_path / "tiny_model"
    if not d.exists():
        os.makedirs(d)
        g = tiny_mobilenet(size=16)
        g.meta["classes"] = ["a", "b", "c", "d"]
        save_run_model(g, str(d))
    return str(d)


def _recipe(tmp_path, name="recipe.yaml", data=None, train=None, federated=None, **kw):
    cfg = dict(model=_model(tmp_path), cut_after="conv_pw_2_relu", freeze="all", unfreeze=["conv_pw_2*"],
               head=["global_avg_pool", {"dense": "auto"}], data={"root": data, "test": 0.25}, input={"size": 16},
               train=dict({"batch_size": 8, "optimizer": "momentum", "lr": 0.05}, **(train or {})), device="cpu",
               federated=dict({"rounds": 3, "local_epochs": 2, "min_clients": 2}, **(federated or {})),
               output=str(tmp_path / "run"))
    cfg.update(kw)
    path = tmp_path / name
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return str(path)


@pytest.fixture
def feature_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TCL_FEATURE_CACHE", str(tmp_path / "featcache"))


@pytest.fixture
def one_client(tmp_path, feature_cache, rt):
    data = make_subset(str(tmp_path / "client"), 12)
    rec = load_recipe(_recipe(tmp_path, data=data))
    c = fed.FederatedClient(rec, name="phone", token=b"t" * 32, log=lambda *a: None)
    yield c, rec
    c.close()


def _config(c, rnd=1, **extra):
    return dict({"tcl_round": rnd, "tcl_rounds": 3, "tcl_local_epochs": 2, "tcl_digest": c.digest,
                 "tcl_classes": json.dumps(c.session.classes), "tcl_params": json.dumps(c.keys),
                 "tcl_nonce": "n1", "tcl_auth": True}, **extra)


def test_a_client_sends_only_the_trainable_arrays_and_scalar_metrics(one_client):
    c, rec = one_client
    plan = c.session.plan
    start = c.get_parameters()
    arrays, n, metrics = c.fit([a.copy() for a in start], _config(c))
    # Exactly the trainable layers' trained parameters, in the announced order and shapes: never the frozen prefix,
    # its cached features, an image or a label.
    assert c.keys == ["conv_pw_2/weight", "conv_pw_2_bn/gamma", "conv_pw_2_bn/beta", "head_dense/weight",
                      "head_dense/bias"]
    assert all(k.split("/")[0] in plan.trainable for k in c.keys)
    assert len(arrays) == len(c.keys)
    for a, k, shape in zip(arrays, c.keys, c.spec["shapes"]):
        assert isinstance(a, np.ndarray) and a.dtype == np.float32 and list(a.shape) == shape, k
    assert sum(a.nbytes for a in arrays) == c.spec["bytes"] == 4 * c.spec["parameters"]
    frozen_bytes = sum(v.nbytes for nd in plan.graph.nodes if nd.name not in plan.trainable for v in nd.params.values())
    assert c.spec["bytes"] < frozen_bytes
    assert any(not np.array_equal(a, b) for a, b in zip(arrays, start))  # it trained
    assert n == len(c.session.splits["train"])
    assert set(metrics) <= set(fed.FIT_METRICS)
    assert all(isinstance(v, (int, float, str, bool)) for v in metrics.values())
    assert metrics["client"] == "phone" and 0 <= metrics["train_accuracy"] <= 1
    # The result is signed with the federation token: any change to an array or a metric breaks it.
    good = fed.sign(b"t" * 32, "n1", c.digest, "fit", arrays, metrics, n)
    assert metrics["tcl_auth"] == good
    arrays[0] = arrays[0] + 1e-3
    assert fed.sign(b"t" * 32, "n1", c.digest, "fit", arrays, metrics, n) != good
    assert fed.sign(b"x" * 32, "n1", c.digest, "fit", arrays, metrics, n) != good

    loss, n_eval, m = c.evaluate(start, _config(c))
    assert isinstance(loss, float) and n_eval == len(c.session.splits["test"]) > 0
    assert set(m) <= set(fed.EVALUATE_METRICS) and all(isinstance(v, (int, float, str, bool)) for v in m.values())


def test_a_client_refuses_another_recipe_a_missing_token_and_wrong_arrays(tmp_path, one_client):
    c, rec = one_client
    out = c.fit(c.get_parameters(), _config(c, tcl_digest="0123456789abcdef"))
    assert out[0] == [] and out[1] == 0 and "recipe digest" in out[2]["tcl_refused"]
    assert "does not match the server's" in c.rejected
    c.rejected = None
    out = c.fit(c.get_parameters()[:-1], _config(c))
    assert out[0] == [] and "arrays" in out[2]["tcl_refused"]
    c.token = None
    out = c.fit(c.get_parameters(), _config(c))
    assert "federation token" in out[2]["tcl_refused"]
    # Another learning rate is another recipe: the digests differ, the paths and data do not matter.
    other = load_recipe(_recipe(tmp_path, name="other.yaml", data=rec["data"]["root"], train={"lr": 0.01}))
    same = load_recipe(_recipe(tmp_path, name="same.yaml", data=str(tmp_path), output=str(tmp_path / "elsewhere"),
                               device="numpy"))
    s = c.session
    assert fed.federation_digest(other, s.model_graph, s.classes, s.pre) != c.digest
    assert fed.federation_digest(same, s.model_graph, s.classes, s.pre) == c.digest


def test_fedprox_keeps_a_client_near_the_global_model(one_client):
    c, _ = one_client
    start = [a.copy() for a in c.get_parameters()]
    free, _, _ = c.fit([a.copy() for a in start], _config(c))
    prox, _, _ = c.fit([a.copy() for a in start], _config(c, proximal_mu=5.0))
    dist = lambda arrs: sum(float(np.sum((a - b) ** 2)) for a, b in zip(arrs, start))  # noqa: E731
    assert 0 < dist(prox) < dist(free)


def test_a_device_with_a_subset_of_the_classes_gets_their_global_indices(tmp_path, feature_cache, rt):
    data = make_subset(str(tmp_path / "client"), 6)
    rec = load_recipe(_recipe(tmp_path, data=data, federated={"classes": ["bird", "cat", "dog"]}))
    c = fed.FederatedClient(rec, log=lambda *a: None)
    try:
        assert c.session.classes == ["bird", "cat", "dog"]
        assert {y for _, y in c.session.splits["train"]} == {1, 2}
        assert c.spec["shapes"][-1] == [3]  # the head has the federation's 3 outputs
    finally:
        c.close()
    rec = load_recipe(_recipe(tmp_path, name="r2.yaml", data=data, federated={"classes": ["cat", "bird"]}))
    with pytest.raises(TclError, match="does not know"):
        fed.FederatedClient(rec, log=lambda *a: None)


def test_certs_tls_files_and_errors(tmp_path):
    r = CliRunner().invoke(main, ["federate", "certs", str(tmp_path / "c"), "--host", "10.0.0.7", "--host", "nas"])
    assert r.exit_code == 0, r.output
    d = tmp_path / "c"
    for name in (fed.CA_CERT, fed.CA_KEY, fed.SERVER_CERT, fed.SERVER_KEY, fed.TOKEN):
        assert (d / name).exists()
    assert oct(os.stat(d / fed.SERVER_KEY).st_mode & 0o777) == "0o600"
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((d / fed.SERVER_CERT).read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "nas"} <= set(san.get_values_for_type(x509.DNSName))
    assert {str(a) for a in san.get_values_for_type(x509.IPAddress)} >= {"127.0.0.1", "10.0.0.7"}
    (ca, crt, key), token = fed.server_tls(str(d), False)
    assert ca.startswith(b"-----BEGIN CERTIFICATE") and len(token) >= 32
    assert fed.client_tls(str(d), False)[1] == token
    # Refused: replacing without --force, a key that is not the certificate's, missing files, no TLS files at all.
    assert CliRunner().invoke(main, ["federate", "certs", str(d)]).exit_code == 2
    fed.make_certs(str(tmp_path / "other"))
    (d / fed.SERVER_KEY).write_bytes((tmp_path / "other" / fed.SERVER_KEY).read_bytes())
    with pytest.raises(TclError, match="does not belong"):
        fed.server_tls(str(d), False)
    with pytest.raises(TclError, match="does not exist"):
        fed.client_tls(str(tmp_path / "nothing"), False)
    with pytest.raises(TclError, match="no --certs"):
        fed.server_tls(None, False)
    with pytest.warns(fed.InsecureWarning, match="without TLS"):
        assert fed.client_tls(None, True) == (None, None)


def test_cron_errors_are_one_paragraph_with_exit_code_2(tmp_path, feature_cache, rt, monkeypatch):
    data = make_subset(str(tmp_path / "client"), 6)
    rec = _recipe(tmp_path, data=data, federated={"server_data": data})
    fed.make_certs(str(tmp_path / "certs"))
    run = CliRunner().invoke
    r = run(main, ["federate", "server", rec, "--address", "127.0.0.1:1"])
    assert r.exit_code == 2 and "TLS files" in r.output and "--insecure" in r.output
    r = run(main, ["federate", "client", rec, "--server", "127.0.0.1:1"])
    assert r.exit_code == 2 and "CA certificate" in r.output
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there
    t0 = time.monotonic()
    r = run(main, ["federate", "client", rec, "--server", f"127.0.0.1:{port}", "--certs", str(tmp_path / "certs"),
                   "--max-wait", "0.5"])
    assert r.exit_code == 2 and "unreachable" in r.output, r.output
    assert time.monotonic() - t0 < 60
    r = run(main, ["federate", "server", rec, "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output[r.output.index("{"):])["travel"]["keys"][0] == "conv_pw_2/weight"
    r = run(main, ["federate", "server", _recipe(tmp_path, name="nc.yaml", data=data), "--certs",
                   str(tmp_path / "certs")])
    assert r.exit_code == 2 and "class names" in r.output
    monkeypatch.setitem(sys.modules, "flwr", None)
    r = run(main, ["federate", "server", rec, "--insecure"])
    assert r.exit_code == 2 and "pip install" in r.output


# -- a federation of real processes ---------------------------------------------------------------------------------
TCL = [sys.executable, "-c", "import sys; from transfercl_cli.cli import main; sys.argv[0] = 'tcl'; main()"]


class Procs:
    def __init__(self, tmp_path, env):
        self.tmp, self.env, self.procs = tmp_path, env, {}

    def start(self, name, *args):
        log = open(self.tmp / f"{name}.log", "w")
        self.procs[name] = subprocess.Popen(TCL + list(args), stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            cwd=str(self.tmp))
        return self.procs[name]

    def log(self, name):
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def logs(self):
        return "\n".join(f"--- {n} (rc {p.poll()}) ---\n{self.log(n)[-3000:]}" for n, p in self.procs.items())

    def wait_until(self, what, cond, timeout, alive=()):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if cond():
                return
            for n in alive:
                if self.procs[n].poll() is not None:
                    pytest.fail(f"{n} exited ({self.procs[n].returncode}) while waiting for {what}\n{self.logs()}")
            time.sleep(0.05)
        pytest.fail(f"timed out after {timeout} s waiting for {what}\n{self.logs()}")

    def exit_code(self, name, timeout):
        try:
            return self.procs[name].wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} did not exit within {timeout} s\n{self.logs()}")

    def close(self):
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(10)


@pytest.mark.slow
def test_a_federation_of_real_flower_processes_over_tls(tmp_path, rt):
    """Server + 4 clients as separate processes, gRPC with TLS on 127.0.0.1: round 1 has every client (one with
    another recipe is refused), a client killed mid-round 2 leaves the round to the other two (min_clients 2), the
    server is killed after round 2 and resumed, the clients reconnect by themselves, round 3 finishes the run. The
    global run directory then serves `tcl evaluate` and `tcl export-weights`."""
    data = {n: make_subset(str(tmp_path / n), 40, offset=40 * i) for i, n in enumerate(("c0", "c1", "victim"))}
    server_data = make_subset(str(tmp_path / "server_data"), 30, offset=120)
    f = {"rounds": 3, "local_epochs": 10, "min_clients": 2, "start_clients": 4, "server_data": server_data,
         "client_wait": 60, "round_timeout": 60}
    rec = _recipe(tmp_path, data=data["c0"], federated=f)
    bad = _recipe(tmp_path, name="other.yaml", data=data["c0"], federated=f, train={"lr": 0.02})
    assert CliRunner().invoke(main, ["federate", "certs", str(tmp_path / "certs"), "--host", "127.0.0.1"]).exit_code == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, TCL_FEATURE_CACHE=str(tmp_path / "featcache"), TCL_NO_AUTOTUNE="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run_dir = tmp_path / "run"
    certs = ["--certs", str(tmp_path / "certs")]
    server = ["federate", "server", rec, "--address", f"127.0.0.1:{port}", *certs]
    p = Procs(tmp_path, env)
    try:
        p.start("server", *server)
        p.wait_until("the server to listen", lambda: "listening on" in p.log("server"), 90, alive=["server"])
        for name in ("c0", "c1", "victim"):
            p.start(name, "federate", "client", rec, "--server", f"127.0.0.1:{port}", *certs, "--data", data[name],
                    "--name", name, "--max-wait", "60")
        p.start("other", "federate", "client", bad, "--server", f"127.0.0.1:{port}", *certs, "--name", "other",
                "--max-wait", "60")
        p.wait_until("round 1", lambda: (run_dir / "rounds" / "round-001.json").exists(), 120, alive=["server"])
        # Kill the victim while it trains in round 2 (frozen first, so that it cannot answer in between).
        p.wait_until("the victim to train in round 2", lambda: "round 2/3: training" in p.log("victim"), 60,
                     alive=["server", "victim"])
        p.procs["victim"].send_signal(signal.SIGSTOP)
        p.procs["victim"].kill()
        p.wait_until("round 2", lambda: (run_dir / "rounds" / "round-002.json").exists(), 90, alive=["server"])
        p.procs["server"].kill()  # a server crash mid-run (round 3 is under way)
        assert p.exit_code("server", 10) != 0
        assert p.exit_code("other", 30) == 2
        p.start("server2", *server, "--resume")
        assert p.exit_code("server2", 120) == 0, p.logs()
        assert p.exit_code("c0", 60) == 0, p.logs()
        assert p.exit_code("c1", 60) == 0, p.logs()
    finally:
        p.close()
    assert "does not match the server's" in p.log("other") and "recipe digest" in p.log("other")
    assert "resume     from round 2 of 3" in p.log("server2")

    rounds = [json.loads((run_dir / "rounds" / f"round-{r:03d}.json").read_text()) for r in (1, 2, 3)]
    by_status = [{c["client"] or c["cid"]: c["status"] for c in r["clients"]} for r in rounds]
    assert by_status[0] == {"c0": "ok", "c1": "ok", "victim": "ok", "other": "refused"}
    assert rounds[1]["status"] == "ok" and rounds[1]["results"] == 2 and rounds[1]["failures"] == 1
    assert sorted(s for s in by_status[1].values()) == ["failed", "ok", "ok"]
    assert rounds[2]["status"] == "ok" and rounds[2]["results"] == 2
    history = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [h["round"] for h in history] == [1, 2, 3]
    for r, h in zip(rounds, history):
        # Accuracy per round: the server's held-out test split, and the clients' own test splits.
        assert 0 <= r["global"]["accuracy"] <= 1 and r["global"]["num_samples"] == 16
        assert h["val_accuracy"] == r["global"]["accuracy"] and "federated_accuracy" in h
        assert r["bytes_sent"] > 0 and r["bytes_received"] > 0
        # What the clients sent: the announced trainable arrays (a few KiB), scalar metrics, nothing else.
        assert r["parameters"]["keys"] == ["conv_pw_2/weight", "conv_pw_2_bn/gamma", "conv_pw_2_bn/beta",
                                           "head_dense/weight", "head_dense/bias"]
        for c in r["clients"]:
            assert set(c["metrics"]) <= set(fed.FIT_METRICS)
            if c["status"] == "ok":
                assert r["parameters"]["bytes"] <= c["bytes_received"] < r["parameters"]["bytes"] + 1024
    assert (run_dir / fed.ACCURACY_PNG).stat().st_size > 1000
    assert json.loads((run_dir / "state.json").read_text())["state"] == "finished"

    # The global model is a run directory like a finetune run's.
    r = CliRunner().invoke(main, ["evaluate", str(run_dir), "--json"])
    assert r.exit_code == 0, r.output
    ev = json.loads(r.output[r.output.index("{"):])["metrics"]
    best = max(history, key=lambda h: h["val_accuracy"])
    assert ev["num_samples"] == 16 and abs(ev["accuracy"] - best["val_accuracy"]) < 1e-9
    r = CliRunner().invoke(main, ["export-weights", str(run_dir), "--format", "npz", "--json"])
    assert r.exit_code == 0, r.output
    assert (run_dir / "export" / "model.npz").exists()
