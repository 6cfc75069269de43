"""`tcl doctor`: checks the installation and explains in plain words what is wrong and how to fix it."""
import importlib
import os
import platform
import sys

# Vendor OpenCL libraries on Android and boards. Adreno's is not an ICD: it must be found through LD_LIBRARY_PATH.
VENDOR_LIBS = [
    ("/vendor/lib64/libOpenCL.so", "/vendor/lib64"),
    ("/system/vendor/lib64/libOpenCL.so", "/system/vendor/lib64"),
    ("/vendor/lib64/egl/libGLES_mali.so", "/vendor/lib64/egl"),
    ("/system/lib64/libOpenCL.so", "/system/lib64"),
    ("/usr/lib/aarch64-linux-gnu/libmali.so", "/usr/lib/aarch64-linux-gnu"),
]


class Check:
    def __init__(self, name, ok, detail, fix=None, fatal=False):
        self.name, self.ok, self.detail, self.fix, self.fatal = name, ok, detail, fix, fatal

    def as_dict(self):
        return {"check": self.name, "ok": self.ok, "detail": self.detail, "fix": self.fix}


def _version(mod):
    try:
        m = importlib.import_module(mod)
        return getattr(m, "__version__", None) or getattr(m, "VERSION_TEXT", None) or "installed"
    except Exception:
        return None


def loaded_opencl_libraries():
    """Paths of OpenCL libraries mapped into this process (Linux/Android)."""
    out = set()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                p = line.split()[-1] if line.strip() else ""
                if "OpenCL" in p or "libGLES_mali" in p or "libpocl" in p:
                    out.add(p)
    except OSError:
        pass
    return sorted(out)


def host_free_memory():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def run_checks(device=None, build=True, selftest=False):
    """A list of Check results; the last entry says whether tcl can run. selftest: also run a small network's
    forward and one training step on each device against the numpy reference (`network_selftest`)."""
    from . import __version__
    from .errors import TclError

    checks = [Check("python", sys.version_info >= (3, 9), f"Python {platform.python_version()} on "
                    f"{platform.system()} {platform.machine()}; tcl {__version__}",
                    "tcl needs Python 3.9 or newer.", fatal=sys.version_info < (3, 9))]
    for mod, required, fix in [
        ("numpy", True, "pip install numpy"), ("pyopencl", True, "pip install pyopencl (on Termux: see the README)"),
        ("click", True, "pip install click"), ("PIL", True, "pip install pillow"), ("yaml", True, "pip install pyyaml"),
        ("tqdm", True, "pip install tqdm"),
        ("h5py", False, "pip install h5py (or, in a clone, .venv/bin/pip install -e '.[h5]') for Keras .h5 files"),
        ("onnx", False, "pip install onnx (or, in a clone, .venv/bin/pip install -e '.[onnx]') for ONNX files"),
    ]:
        v = _version(mod)
        checks.append(Check(f"package {mod}", v is not None or not required,
                            f"{mod} {v}" if v else f"{mod} not installed" + ("" if required else " (optional)"),
                            None if v else fix, fatal=required and v is None))
    runnable = []
    try:
        from .runtime import build_failure_fix, cache_dir, list_devices

        devs = list_devices()
        checks.append(Check("opencl platforms", True, "; ".join(
            f"{d.id} {d.name} [{d.type}] on {d.platform_name}" for d in devs)))
    except TclError as e:
        devs = []
        checks.append(Check("opencl platforms", False, e.message, e.fix))
    libs = loaded_opencl_libraries()
    checks.append(Check("opencl library", bool(libs), ", ".join(libs) if libs else "no OpenCL library is loaded",
                        None if libs else "Install an ICD loader (ocl-icd) and a platform (PoCL, or the vendor's)."))
    ld = os.environ.get("LD_LIBRARY_PATH", "")
    for lib, folder in VENDOR_LIBS:
        if os.path.exists(lib) and not any(lib == p or os.path.realpath(lib) == os.path.realpath(p) for p in libs):
            prefix = os.environ.get("PREFIX", "/data/data/com.termux/files/usr")
            checks.append(Check("vendor library", False, f"{lib} exists but is not loaded",
                                f"Run with: export LD_LIBRARY_PATH={folder}:{prefix}/lib"
                                + (f":{ld}" if ld else "")))
    for d in devs:
        if device is not None:
            from .runtime import select_device

            if select_device(device, devs) is not d:
                continue
        checks.append(Check(f"device {d.id}", True,
                            f"{d.name}: {d.compute_units} compute units, {d.global_mem / 2**20:.0f} MiB global memory,"
                            f" {d.opencl_c_version}, fp16 {'yes' if d.fp16 else 'no'}, fp64 {'yes' if d.fp64 else 'no'}"
                            " (precision: fp16 stores half values on every device; it needs neither)"))
        if build or selftest:
            ok, detail, rt = _device_selftest(d)
            checks.append(Check(f"kernels on {d.id}", ok, detail, None if ok else build_failure_fix(
                detail, "Report this with the output of `tcl doctor --json`; try another device with --device.")))
            if ok and selftest:
                ok, detail = _network_check(rt)
                checks.append(Check(f"selftest on {d.id}", ok, ("PASS: " if ok else "FAIL: ") + detail,
                                    None if ok else "This device computes wrong results: train with another one "
                                    "(--device; `--device numpy` is slow but exact) and report this with the output "
                                    "of `tcl doctor --selftest --json`."))
            if ok:
                runnable.append(d.id)
    free = host_free_memory()
    if free is not None:
        checks.append(Check("host memory", free > 256 * 2**20, f"{free / 2**20:.0f} MiB available",
                            "Close other programs or lower train.batch_size."))
    try:
        d = cache_dir()
        probe = os.path.join(d, ".write-test")
        with open(probe, "w") as f:
            f.write("ok")
        os.unlink(probe)
        checks.append(Check("cache directory", True, f"{d} is writable"))
    except (OSError, NameError) as e:
        checks.append(Check("cache directory", False, f"cannot write the cache directory ({e})",
                            "Set TCL_CACHE_DIR to a writable folder."))
    fatal = any(c.fatal for c in checks)
    ok = bool(runnable) and not fatal
    checks.append(Check("verdict", ok, f"tcl can run on {', '.join(runnable)}" if ok else
                        "no OpenCL device can run tcl here",
                        None if ok else "Fix the items above; `--device numpy` works without OpenCL (slowly)."))
    return checks


def _device_selftest(info):
    """(ok, detail, runtime): build every kernel file and check the saxpy kernel's result."""
    import numpy as np

    from .runtime import UNKNOWN_CPU, Runtime, kernel_names

    rt = None
    try:
        rt = Runtime(info)
        names = kernel_names()
        for n in names:
            rt.program(n)
        x = np.arange(8, dtype=np.float32)
        dx, dy = rt.to_device(x), rt.to_device(np.ones(8, np.float32))
        rt.launch(rt.kernel("selftest", "saxpy"), (8,), None, np.int32(8), np.float32(2), dx, dy)
        if not np.allclose(rt.to_host(dy), 2 * x + 1):
            return False, "the self-test kernel gave wrong results", rt
        return True, f"{len(names)} kernel files built ({', '.join(names)}); self-test correct", rt
    except Exception as e:  # noqa: BLE001 - doctor reports every failure in words
        text = str(e)
        cpu = [line.strip() for line in text.splitlines() if UNKNOWN_CPU in line]
        if cpu:  # the log's one telling line, which 500 characters of the message would cut off
            return False, f"the OpenCL compiler cannot build for this processor ({cpu[0]})", rt
        return False, f"{type(e).__name__}: {text[:500]}", rt


def _network_check(rt):
    try:
        return network_selftest(rt)
    except Exception as e:  # noqa: BLE001 - a crash is a failed self-test, reported in words
        return False, f"the self-test network failed to run: {type(e).__name__}: {str(e)[:500]}"


# ---------------------------------------------------------------------------------------------------------------
# `tcl doctor --selftest`: a small network end to end on a device against the numpy reference backend.

SELFTEST_TOL = 2e-3  # relative to the largest magnitude of each compared tensor (float32 kernels vs float64)


def selftest_graph(seed=0):
    """A MobileNet-shaped network small enough for any device (and a simulator): conv 3x3 stride 2 on RGB (the
    direct kernel), BatchNorm + ReLU6, depthwise 3x3, BatchNorm + ReLU6, pointwise 1x1 (GEMM) with a fused ReLU, a
    3x3 max pool, global average pool and a dense head."""
    import numpy as np

    from .graph import Graph, Node

    rng = np.random.default_rng(seed)
    f = lambda *s, scale=1.0: (rng.standard_normal(s) * scale).astype(np.float32)  # noqa: E731

    def bn(name, c, x):
        return Node(name, "batchnorm", [x], [name], {"eps": 1e-3, "momentum": 0.9},
                    {"gamma": rng.uniform(0.5, 1.5, c).astype(np.float32), "beta": f(c, scale=0.1),
                     "mean": f(c, scale=0.1), "var": rng.uniform(0.5, 1.5, c).astype(np.float32)})

    conv = {"strides": (1, 1), "dilations": (1, 1)}
    nodes = [
        Node("conv1", "conv2d", ["input"], ["conv1"], dict(conv, kernel=(3, 3), strides=(2, 2), pads=(0, 0, 1, 1)),
             {"weight": f(3, 3, 3, 8, scale=0.3)}),
        bn("conv1_bn", 8, "conv1"),
        Node("conv1_relu", "relu6", ["conv1_bn"], ["conv1_relu"]),
        Node("conv_dw", "conv2d", ["conv1_relu"], ["conv_dw"], dict(conv, kernel=(3, 3), pads=(1, 1, 1, 1), groups=8),
             {"weight": f(3, 3, 1, 8, scale=0.4)}),
        bn("conv_dw_bn", 8, "conv_dw"),
        Node("conv_dw_relu", "relu6", ["conv_dw_bn"], ["conv_dw_relu"]),
        Node("conv_pw", "conv2d", ["conv_dw_relu"], ["conv_pw"], dict(conv, kernel=(1, 1), pads=(0, 0, 0, 0),
                                                                          act="relu"),
             {"weight": f(1, 1, 8, 20, scale=0.4), "bias": f(20, scale=0.1)}),
        Node("pool", "maxpool", ["conv_pw"], ["pool"], {"kernel": (3, 3), "strides": (1, 1), "pads": (1, 1, 1, 1)}),
        Node("gap", "global_avgpool", ["pool"], ["gap"], {"keepdims": False}),
        Node("predictions", "dense", ["gap"], ["logits"], {}, {"weight": f(20, 3, scale=0.5), "bias": f(3, scale=0.1)}),
    ]
    return Graph(nodes, {"input": (11, 11, 3)}, ["logits"], "selftest")


def _train_step(be, graph, x, labels, lr):
    """Forward in training mode, softmax cross-entropy, backward and one SGD (momentum) step; returns (logits, loss,
    {(node, param): updated values}) on the host."""
    import numpy as np

    from .executor import Executor

    trainable = {n.name for n in graph.nodes if n.params}
    ex = Executor(graph, be, trainable)
    out = ex.forward({"input": x}, training=True)["logits"]
    lab = be.asarray(np.asarray(labels, np.int32))
    loss, glogits = be.fn("softmax_xent")(be, out, lab, label_smoothing=0.1, class_weights=None)
    logits = np.asarray(be.to_host(out), np.float64)
    grads = ex.backward({"logits": glogits})
    state = {}
    params = {}
    for k, g in grads.items():
        if k[1] in ("weight", "bias", "gamma", "beta"):
            p = be.param(graph.node(k[0]), k[1])
            be.fn("sgd_step")(be, p, g, state.setdefault(k, {}), lr, momentum=0.9)
            params[k] = np.asarray(be.to_host(p), np.float64)
    return logits, float(loss), params


def network_selftest(rt, seed=0, tol=SELFTEST_TOL):
    """(ok, detail): the selftest network's forward and one training step on rt against the numpy reference."""
    import numpy as np

    from .backends import CLBackend, NumpyBackend

    rng = np.random.default_rng(seed + 1)
    x = rng.uniform(-1, 1, (3, 11, 11, 3)).astype(np.float32)
    labels = [0, 2, 1]
    lr = 0.05
    results = []
    for be in (NumpyBackend(), CLBackend(rt)):
        g = selftest_graph(seed)  # each backend updates its own copy
        before = {(n.name, k): n.params[k].astype(np.float64) for n in g.nodes for k in n.params}
        logits, loss, params = _train_step(be, g, x, labels, lr)
        results.append((logits, loss, {k: v.reshape(before[k].shape) - before[k] for k, v in params.items()}))
    (l_ref, loss_ref, d_ref), (l_cl, loss_cl, d_cl) = results

    def err(a, e):
        return float(np.max(np.abs(a - e)) / max(float(np.max(np.abs(e))), 1e-6))

    worst = [("forward logits", err(l_cl, l_ref)), ("loss", abs(loss_cl - loss_ref) / max(abs(loss_ref), 1e-6))]
    missing = sorted(set(d_ref) - set(d_cl))
    if missing:
        return False, f"the training step gave no update for {', '.join(f'{a}.{b}' for a, b in missing)}"
    worst += [(f"update of {k[0]}.{k[1]}", err(d_cl[k], d_ref[k])) for k in sorted(d_ref)]
    bad = [(w, e) for w, e in worst if not e <= tol]
    top = max(worst, key=lambda t: t[1])
    if bad:
        return False, (f"{len(bad)} of {len(worst)} results differ from the numpy reference by more than {tol:g} "
                       f"(relative): " + "; ".join(f"{w} {e:.2g}" for w, e in bad[:6]))
    return True, (f"forward and one training step of a {len(selftest_graph(seed).nodes)}-node network match the "
                  f"numpy reference ({len(worst)} results, largest relative difference {top[1]:.1g}: {top[0]})")
