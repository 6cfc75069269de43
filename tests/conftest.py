import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("TCL_SHARED") or os.path.join(os.path.dirname(ROOT), "shared")
# Autotuning takes seconds per process; tests force each variant explicitly instead.
os.environ.setdefault("TCL_NO_AUTOTUNE", "1")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# The Oclgrind OpenCL simulator (Debian package oclgrind) as a test device, without registering it system-wide: an
# ICD vendors folder holding only its .icd file. tests/test_oclgrind.py runs tests/oclgrind_cases.py on it; any test
# file runs on it with TCL_TEST_DEVICE=oclgrind (and TCL_TEST_STYLE=cpu for the CPU-style kernel variants).
OCLGRIND_ICD = "/usr/lib/oclgrind/liboclgrind-rt-icd.so"


def oclgrind_available():
    return os.path.exists(OCLGRIND_ICD)


def oclgrind_env(vendors_dir, base=None):
    """Environment variables for a process whose test device is Oclgrind with API, bounds and data-race checks on.
    Program caches are off (pyopencl's and tcl's binary cache): Oclgrind rebuilds cached binaries without the build
    options."""
    os.makedirs(vendors_dir, exist_ok=True)
    with open(os.path.join(vendors_dir, "oclgrind.icd"), "w") as f:
        f.write(OCLGRIND_ICD + "\n")
    env = dict(os.environ if base is None else base)
    env.update(OCL_ICD_VENDORS=vendors_dir, PYOPENCL_NO_CACHE="1", TCL_NO_BINARY_CACHE="1", TCL_NO_AUTOTUNE="1",
               TCL_TEST_DEVICE="oclgrind", OCLGRIND_CHECK_API="1", OCLGRIND_DATA_RACES="1")
    return env


if os.environ.get("TCL_TEST_DEVICE") == "oclgrind" and "OCL_ICD_VENDORS" not in os.environ and oclgrind_available():
    import tempfile

    os.environ.update(oclgrind_env(tempfile.mkdtemp(prefix="tcl-oclgrind-"), base={}))


def pytest_configure(config):
    config.addinivalue_line("markers", "oclgrind: runs kernels on the Oclgrind simulator (skips without it)")


def shared_path(*parts):
    """A path under ../shared, or skip the test cleanly when shared material is absent (a user's machine)."""
    p = os.path.join(SHARED, *parts)
    if not os.path.exists(p):
        pytest.skip(f"shared material not available: {p}")
    return p


@pytest.fixture(scope="session")
def rt():
    """The OpenCL runtime on the PoCL/CPU (or first) device; skips when no OpenCL platform exists."""
    from transfercl_cli.errors import DeviceError
    from transfercl_cli.runtime import get_runtime

    try:
        rt = get_runtime(os.environ.get("TCL_TEST_DEVICE", "cpu"))
    except DeviceError as e:
        try:
            rt = get_runtime(None)
        except DeviceError:
            pytest.skip(f"no OpenCL device: {e}")
    style = os.environ.get("TCL_TEST_STYLE")  # cpu / gpu: the kernel variants chosen by device type
    if style in ("cpu", "gpu"):
        rt.is_cpu = style == "cpu"
    return rt


@pytest.fixture(scope="session")
def clbe(rt):
    from transfercl_cli.backends import CLBackend

    return CLBackend(rt)


@pytest.fixture
def npbe():
    from transfercl_cli.backends import NumpyBackend

    return NumpyBackend()
