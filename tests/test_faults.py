"""The fault suite: each test injects a fault (a diverging schedule, a poisoned parameter, Ctrl-C, kill -9, a disk
that fills up, unreadable images) and asserts the exit code, the message, and that nothing written before is lost
or replaced by a wrong result. The feature cache's own faults are in test_cache.py, bad recipe and file inputs in
test_bad_input.py."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from transfercl_cli.cli import main

from .test_train import ROOT, feature_cache, make_subset, run_recipe, tiny_setup, write_recipe  # noqa: F401


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def npz(path):
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def all_finite(run):
    for f in ("checkpoint.npz", "best.npz", "weights.npz"):
        if (run / f).exists():
            for k, v in npz(run / f).items():
                assert np.isfinite(v).all(), f"{f}: {k}"


def state(run):
    return json.loads((run / "state.json").read_text())


def snapshot(run):
    return {f: (run / f).read_bytes() for f in os.listdir(run) if (run / f).is_file()}


def first_image(data):
    d = os.path.join(data, "cat")
    return os.path.join(d, sorted(os.listdir(d))[0])


def test_diverging_schedule_stops_and_keeps_the_last_good_epoch(tiny_setup):
    """The issue's case: a step schedule that multiplies the learning rate after 2 good epochs."""
    tmp, base = tiny_setup
    train = dict(base["train"], schedule="step", step_size=2, gamma=1e12)
    good = run_recipe(tmp, base, "good2", train=dict(train, epochs=2))
    rec = write_recipe(tmp / "div.yaml", **dict(base, train=train, output=str(tmp / "div")))
    res = cli("finetune", rec, "--quiet")
    assert res.exit_code == 2, res.output
    assert "diverged in epoch 3" in res.output and "schedule" in res.output and "--resume" in res.output
    assert "Traceback" not in res.output and "Internal error" not in res.output
    run = tmp / "div"
    all_finite(run)
    assert json.loads((run / "checkpoint.json").read_text())["epoch"] == 1  # epoch 2 (0-based 1) is kept
    assert state(run)["state"] == "diverged" and state(run)["epochs_finished"] == 2
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    # The kept checkpoint is exactly what a run of 2 epochs ends with (same seed, same device).
    ck, ref = npz(run / "checkpoint.npz"), npz(tmp / "good2" / "weights.npz")
    for k in ref:
        np.testing.assert_array_equal(ck[k], ref[k], err_msg=k)
    # The run is unfinished: predict uses epoch 2 and says so on stderr.
    res = cli("predict", run, first_image(base["data"]["root"]), "--json")
    assert res.exit_code == 0, res.output
    assert "unfinished" in res.stderr and "epoch 2" in res.stderr
    # --resume continues from the last good epoch once the schedule is fixed.
    fixed = write_recipe(tmp / "div.yaml", **dict(base, train=dict(train, gamma=0.5), output=str(run)))
    res = cli("finetune", fixed, "--quiet", "--resume")
    assert res.exit_code == 0, res.output
    assert state(run)["state"] == "finished" and len((run / "metrics.jsonl").read_text().splitlines()) == 4
    all_finite(run)


def test_a_parameter_poisoned_in_the_last_step_is_caught_before_any_write(tiny_setup, monkeypatch):
    """NaN gradients that reach a parameter in the epoch's last step produce no NaN loss or logit in that epoch: the
    per-epoch parameter check stops the run before the checkpoint is written."""
    from transfercl_cli import train as train_mod

    tmp, base = tiny_setup
    real = train_mod.Optimizer.step
    calls = {"n": 0}

    def poison_step_six(self, params, grads, lr):
        real(self, params, grads, lr)
        calls["n"] += 1
        if calls["n"] == 6:  # 3 steps per epoch: the last step of epoch 2
            k = next(iter(params))
            a = self.be.to_host(params[k]).copy()
            a.flat[0] = np.nan
            self.be.rt.to_device(a, out=params[k])

    monkeypatch.setattr(train_mod.Optimizer, "step", poison_step_six)
    rec = write_recipe(tmp / "p.yaml", **dict(base, output=str(tmp / "p")))
    res = cli("finetune", rec, "--quiet")
    assert res.exit_code == 2, res.output
    assert "diverged in epoch 2" in res.output and "non-finite" in res.output
    run = tmp / "p"
    all_finite(run)
    assert json.loads((run / "checkpoint.json").read_text())["epoch"] == 0


def test_runaway_loss_stops_before_nan(tiny_setup, monkeypatch):
    from transfercl_cli import train as train_mod

    tmp, base = tiny_setup
    real = train_mod.Trainer.step
    calls = {"n": 0}

    def explode_in_epoch_three(self, *a, **kw):
        loss, correct = real(self, *a, **kw)
        calls["n"] += 1
        return (loss * 1e6 if calls["n"] > 6 else loss), correct

    monkeypatch.setattr(train_mod.Trainer, "step", explode_in_epoch_three)
    rec = write_recipe(tmp / "r.yaml", **dict(base, output=str(tmp / "r")))
    res = cli("finetune", rec, "--quiet")
    assert res.exit_code == 2 and "diverged in epoch 3" in res.output and "rose to" in res.output, res.output
    assert "train.lr" in res.output
    assert json.loads((tmp / "r" / "checkpoint.json").read_text())["epoch"] == 1


def test_interrupted_run_serves_its_last_finished_epoch_or_refuses(tiny_setup, monkeypatch):
    from transfercl_cli import train as train_mod

    tmp, base = tiny_setup
    real_step = train_mod.Trainer.step
    stop_at = {"n": 5}
    calls = {"n": 0}

    def interrupt(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == stop_at["n"]:
            raise KeyboardInterrupt
        return real_step(self, *a, **kw)

    monkeypatch.setattr(train_mod.Trainer, "step", interrupt)
    img = first_image(base["data"]["root"])
    rec = write_recipe(tmp / "i.yaml", **dict(base, output=str(tmp / "i")))
    assert cli("finetune", rec, "--quiet").exit_code == 130
    run = tmp / "i"
    assert state(run) == dict(state(run), state="interrupted", epochs_finished=1, epochs_planned=4)
    assert not (run / "weights.npz").exists()  # never the untrained head
    for cmd in (("predict", run, img), ("evaluate", run, "--json")):
        res = cli(*cmd)
        assert res.exit_code == 0, res.output
        assert "unfinished" in res.stderr and "epoch 1" in res.stderr and "--resume" in res.stderr
    # The prediction is the checkpoint's (epoch 1), not the untrained head's.
    from transfercl_cli.evaluate import Predictor, _model_preprocess
    from transfercl_cli.runfile import load_run_model

    with pytest.warns(UserWarning, match="unfinished"):
        g = load_run_model(str(run))
    ck = dict(npz(run / "frozen.npz"), **npz(run / "checkpoint.npz"))  # frozen layers once, trained per checkpoint
    for n in g.nodes:
        for k, v in n.params.items():
            np.testing.assert_array_equal(v, ck[f"{n.name}/{k}"].reshape(v.shape))
    p = Predictor(g, "cpu").probs(_model_preprocess(g)(img)[None])[0]
    res = json.loads(cli("predict", run, img, "--json", "--top", "2").stdout)
    assert res[0]["top"][0]["probability"] == pytest.approx(float(p.max()), abs=1e-6)
    # Interrupted inside epoch 1: nothing trained, so every reader refuses with the way out.
    calls["n"], stop_at["n"] = 0, 2
    rec2 = write_recipe(tmp / "i2.yaml", **dict(base, output=str(tmp / "i2")))
    assert cli("finetune", rec2, "--quiet").exit_code == 130
    for cmd in (("predict", tmp / "i2", img), ("evaluate", tmp / "i2"), ("export-weights", tmp / "i2",
                                                                           "--format", "npz")):
        res = cli(*cmd)
        assert res.exit_code == 2 and "no trained weights" in res.output and "--resume" in res.output, cmd
        assert "Traceback" not in res.output


# Runs `tcl finetune RECIPE --quiet ...` and kills itself with SIGKILL on the N-th call of a function
# (KILL_AT=module.Class.method:N, in transfercl_cli): a crash at a chosen point, with nothing flushed or cleaned up.
KILL_SCRIPT = r"""
import importlib, os, signal, sys
from transfercl_cli.cli import main
where, at = os.environ["KILL_AT"].split(":")
mod, *path, name = where.split(".")
owner = importlib.import_module("transfercl_cli." + mod)
for p in path:
    owner = getattr(owner, p)
real, n = getattr(owner, name), {"n": 0}
def killer(*a, **kw):
    n["n"] += 1
    if n["n"] == int(at):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*a, **kw)
setattr(owner, name, killer)
main(["finetune", sys.argv[1], "--quiet"] + sys.argv[2:])
"""


def _killed_run(recipe, kill_at, *extra):
    env = dict(os.environ, KILL_AT=kill_at, PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-c", KILL_SCRIPT, recipe, *extra], env=env, capture_output=True, timeout=300)
    return p.returncode


def test_kill_9_mid_epoch_then_resume_gives_the_uninterrupted_result(tiny_setup):
    tmp, base = tiny_setup
    full = run_recipe(tmp, base, "full")
    rec = write_recipe(tmp / "k.yaml", **dict(base, output=str(tmp / "k")))
    assert _killed_run(rec, "train.Trainer.step:8") == -signal.SIGKILL  # step 8 is in epoch 3
    run = tmp / "k"
    assert state(run)["state"] == "training" and state(run)["epochs_finished"] == 2
    assert json.loads((run / "checkpoint.json").read_text())["epoch"] == 1
    res = cli("predict", run, first_image(base["data"]["root"]))
    assert res.exit_code == 0 and "epoch 2" in res.stderr, res.output
    res = cli("finetune", rec, "--quiet", "--resume")
    assert res.exit_code == 0, res.output
    w, ref = npz(run / "weights.npz"), npz(tmp / "full" / "weights.npz")
    for k in ref:
        np.testing.assert_allclose(w[k], ref[k], rtol=1e-6, atol=1e-7, err_msg=k)
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["train_loss"] == pytest.approx(full["history"][-1]["train_loss"], rel=1e-5)


def test_kill_9_between_checkpoint_and_best_weights_loses_nothing(tiny_setup):
    """The checkpoint is the commit point: killed right after it (before best.npz and metrics.jsonl are written),
    a resume rebuilds both from it and ends with the uninterrupted run's files."""
    tmp, base = tiny_setup
    run_recipe(tmp, base, "full_b")
    rec = write_recipe(tmp / "kb.yaml", **dict(base, output=str(tmp / "kb")))
    assert _killed_run(rec, "rundir.RunDir.write_best:1") == -signal.SIGKILL
    run = tmp / "kb"
    ck = json.loads((run / "checkpoint.json").read_text())
    assert len((run / "metrics.jsonl").read_text().splitlines()) == ck["epoch"]  # one line behind the checkpoint
    assert cli("finetune", rec, "--quiet", "--resume").exit_code == 0
    for f in ("weights.npz", "best.npz"):
        a, b = npz(run / f), npz(tmp / "full_b" / f)
        for k in b:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7, err_msg=f"{f} {k}")
    assert (run / "metrics.jsonl").read_text().count("\n") == 4


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tiny_setup, monkeypatch):
    import errno

    from transfercl_cli import fsutil

    tmp, base = tiny_setup
    run = tmp / "df"
    run_recipe(tmp, base, "df", train=dict(base["train"], epochs=1), output=str(run))
    before = snapshot(run)
    real = np.savez
    calls = {"n": 0}

    def savez_fills_the_disk(f, **arrays):
        calls["n"] += 1
        if calls["n"] == 1:  # epoch 2's checkpoint, 100 bytes into the file
            f.write(b"x" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(f, **arrays)

    monkeypatch.setattr(np, "savez", savez_fills_the_disk)
    rec = write_recipe(tmp / "df.yaml", **dict(base, output=str(run)))
    res = cli("finetune", rec, "--quiet", "--resume")
    assert res.exit_code == 2 and "No space left" in res.output and "Traceback" not in res.output, res.output
    assert not [f for f in os.listdir(run) if f.endswith(".tmp")]  # no temp file left behind
    after = snapshot(run)
    # The epoch-1 files that say what the checkpoint is are untouched; a resume still starts from epoch 1.
    for f in ("checkpoint.npz", "checkpoint.json", "metrics.jsonl", "weights.npz", "best.npz", "model.json"):
        assert after[f] == before[f], f
    assert json.loads(after["state.json"])["state"] == "failed"
    monkeypatch.setattr(np, "savez", real)
    assert fsutil  # (np.savez is what fsutil.save_npz calls)
    res = cli("finetune", rec, "--quiet", "--resume")
    assert res.exit_code == 0, res.output
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4


def _bad_files(root):
    """One of each kind of unreadable image, in the dog class."""
    d = os.path.join(root, "dog")
    png = open(os.path.join(d, sorted(os.listdir(d))[0]), "rb").read()
    files = {"zz_random.jpg": os.urandom(3000), "zz_truncated.png": png[: len(png) // 2], "zz_empty.png": b"",
             "zz_text.jpg": b"this is a text file, not a JPEG\n"}
    for name, data in files.items():
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)
    os.symlink(os.path.join(d, "no_such_file.png"), os.path.join(d, "zz_dangling.png"))
    return [os.path.join(d, n) for n in list(files) + ["zz_dangling.png"]]


def test_unreadable_images_are_announced_at_plan_time_and_excluded(tiny_setup):
    tmp, base = tiny_setup
    bad = _bad_files(base["data"]["root"])
    rec = write_recipe(tmp / "b.yaml", **dict(base, train=dict(base["train"], epochs=1), output=str(tmp / "b")))
    res = cli("finetune", rec, "--dry-run")
    assert res.exit_code == 0, res.output
    warn = [ln for ln in res.stderr.splitlines() if "unreadable" in ln]
    assert len(warn) == 1 and "5 unreadable" in warn[0] and "data.strict" in warn[0]
    # The plan counts only readable images: 24 good ones, split 12/6/6 as before the bad files appeared.
    plan = [ln for ln in res.stdout.splitlines() if ln.startswith("data")][0]
    assert "train 12" in plan and "val 6" in plan and "test 6" in plan, plan
    for cache in ("auto", "off"):
        rec = write_recipe(tmp / f"b_{cache}.yaml", **dict(base, train=dict(base["train"], epochs=1, cache=cache),
                                                         output=str(tmp / f"b_{cache}")))
        res = cli("finetune", rec, "--quiet")
        assert res.exit_code == 0, res.output
        listed = {os.path.basename(b["path"]) for b in
                  json.loads((tmp / f"b_{cache}" / "report.json").read_text())["meta"]["bad_images"]}
        assert listed == {os.path.basename(p) for p in bad}, cache
    strict = write_recipe(tmp / "s.yaml", **dict(base, data=dict(base["data"], strict=True), output=str(tmp / "s")))
    res = cli("finetune", strict)
    assert res.exit_code == 2 and "5 of the dataset's 29 images" in res.output and "zz_" in res.output
    assert not (tmp / "s").exists()


def test_early_stopping_without_a_validation_split_is_refused(tiny_setup):
    tmp, base = tiny_setup
    rec = write_recipe(tmp / "e.yaml", **dict(base, data=dict(base["data"], val=0.0),
                                              train=dict(base["train"], early_stopping=2), output=str(tmp / "e")))
    res = cli("finetune", rec)
    assert res.exit_code == 2 and "early_stopping" in res.output and "data.val" in res.output, res.output


def test_predict_exit_code_folders_and_label_counts(tiny_setup, tmp_path):
    tmp, base = tiny_setup
    run = tmp / "pr"
    run_recipe(tmp, base, "pr", train=dict(base["train"], epochs=1), output=str(run))
    folder = tmp_path / "imgs"
    make_subset(str(folder), 2)
    bad = folder / "cat" / "broken.jpg"
    bad.write_bytes(b"not an image")
    # A folder means the images inside it; one unreadable image makes the exit code non-zero.
    res = cli("predict", run, folder, "--json")
    assert res.exit_code == 2, res.output
    out = json.loads(res.stdout)
    assert len(out) == 5 and sum("error" in r for r in out) == 1
    assert "1 of 5 images could not be read" in res.stderr and "broken.jpg" in res.stderr
    # evaluate skips it too, and says so on stderr (not only inside report.md).
    res = cli("evaluate", run, "--data", folder, "--split", "all", "-o", tmp_path / "rep")
    assert res.exit_code == 0 and "1 unreadable image(s) skipped" in res.stderr and "broken.jpg" in res.stderr
    bad.unlink()
    res = cli("predict", run, folder)
    assert res.exit_code == 0 and res.output.count("cat") >= 2
    # A labels file whose length is not the model's output count (2 classes) is refused.
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\n")
    for cmd in (("predict", run, first_image(base["data"]["root"]), "--labels", labels),
                ("evaluate", run, "--labels", labels)):
        res = cli(*cmd)
        assert res.exit_code == 2 and "3 class names" in res.output and "2 outputs" in res.output, cmd


# Fault classes beyond the list: a scheduler's SIGTERM, two runs writing one directory, a run that would
# replace its own model.

SIGTERM_SCRIPT = r"""
import os, signal, sys
from transfercl_cli import train
from transfercl_cli.cli import main
real, n = train.Trainer.step, {"n": 0}
def step(self, *a, **kw):
    n["n"] += 1
    if n["n"] == 5:
        os.kill(os.getpid(), signal.SIGTERM)
    return real(self, *a, **kw)
train.Trainer.step = step
main(["finetune", sys.argv[1], "--quiet"])
"""


def test_sigterm_stops_like_ctrl_c(tiny_setup):
    """cron and termux-job-scheduler stop overrunning jobs with SIGTERM: the run records 'interrupted' and keeps
    its last finished epoch, and says how to continue."""
    tmp, base = tiny_setup
    rec = write_recipe(tmp / "t.yaml", **dict(base, output=str(tmp / "t")))
    p = subprocess.run([sys.executable, "-c", SIGTERM_SCRIPT, rec], env=dict(os.environ, PYTHONPATH=ROOT),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 130 and "--resume" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert state(tmp / "t")["state"] == "interrupted" and state(tmp / "t")["epochs_finished"] == 1


def test_a_second_run_on_the_same_directory_is_refused(tiny_setup):
    import fcntl

    tmp, base = tiny_setup
    run = tmp / "busy"
    os.makedirs(run)
    rec = write_recipe(tmp / "busy.yaml", **dict(base, output=str(run)))
    with open(run / ".lock", "a+") as f:  # what a running `tcl finetune` holds
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        f.write("4242")
        f.flush()
        res = cli("finetune", rec, "--quiet")
        assert res.exit_code == 2 and "Another `tcl finetune`" in res.output and "4242" in res.output
        assert sorted(os.listdir(run)) == [".lock"]
    assert cli("finetune", rec, "--quiet").exit_code == 0  # the lock went with its holder


def test_a_run_never_replaces_its_own_model_or_lands_in_its_data(tiny_setup):
    tmp, base = tiny_setup
    first = tmp / "first"
    run_recipe(tmp, base, "first", train=dict(base["train"], epochs=1), output=str(first))
    before = snapshot(first)
    rec = write_recipe(tmp / "same.yaml", **dict(base, model=str(first), output=str(first)))
    res = cli("finetune", rec, "--force", "--quiet")
    assert res.exit_code == 2 and "would replace the model" in res.output
    assert snapshot(first) == before
    inside = write_recipe(tmp / "in.yaml", **dict(base, output=os.path.join(base["data"]["root"], "cat", "run")))
    res = cli("finetune", inside, "--quiet")
    assert res.exit_code == 2 and "inside its data folder" in res.output


def test_damaged_checkpoint_or_state_is_a_clear_error_and_changes_nothing(tiny_setup):
    tmp, base = tiny_setup
    run = tmp / "dmg"
    run_recipe(tmp, base, "dmg", train=dict(base["train"], epochs=1), output=str(run))
    rec = write_recipe(tmp / "dmg.yaml", **dict(base, output=str(run)))
    # checkpoint.json is only a readable copy: garbage there does not stop a resume (checkpoint.npz is the truth).
    good_json = (run / "checkpoint.json").read_bytes()
    (run / "checkpoint.json").write_text('{"epoch": 0, "hist')
    ck = (run / "checkpoint.npz").read_bytes()
    (run / "checkpoint.npz").write_bytes(ck[: len(ck) // 2])
    before = snapshot(run)
    res = cli("finetune", rec, "--quiet", "--resume")
    assert res.exit_code == 2 and "checkpoint" in res.output and "damaged" in res.output, res.output
    assert "Traceback" not in res.output and "Internal error" not in res.output
    assert snapshot(run) == before
    (run / "checkpoint.npz").write_bytes(ck)
    assert cli("finetune", rec, "--quiet", "--resume").exit_code == 0
    assert json.loads((run / "checkpoint.json").read_bytes())["epoch"] == 3 and good_json
    (run / "state.json").write_text("{not json")
    for cmd in (("evaluate", run), ("predict", run, first_image(base["data"]["root"]))):
        res = cli(*cmd)
        assert res.exit_code == 2 and "state.json" in res.output and "damaged" in res.output, res.output
