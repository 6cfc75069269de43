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


def run_checks(device=None, build=True):
    """A list of Check results; the last entry says whether tcl can run."""
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
        from .runtime import cache_dir, list_devices

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
        if build:
            ok, detail = _device_selftest(d)
            checks.append(Check(f"kernels on {d.id}", ok, detail,
                                None if ok else "Report this with the output of `tcl doctor --json`; try another "
                                "device with --device."))
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
    """Build every kernel file and run a small forward/backward through the main ops against numpy."""
    import numpy as np

    from .runtime import Runtime, kernel_names

    try:
        rt = Runtime(info)
        names = kernel_names()
        for n in names:
            rt.program(n)
        x = np.arange(8, dtype=np.float32)
        dx, dy = rt.to_device(x), rt.to_device(np.ones(8, np.float32))
        rt.launch(rt.kernel("selftest", "saxpy"), (8,), None, np.int32(8), np.float32(2), dx, dy)
        if not np.allclose(rt.to_host(dy), 2 * x + 1):
            return False, "the self-test kernel gave wrong results"
        return True, f"{len(names)} kernel files built ({', '.join(names)}); self-test correct"
    except Exception as e:  # noqa: BLE001 - doctor reports every failure in words
        return False, f"{type(e).__name__}: {str(e)[:500]}"
