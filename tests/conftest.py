import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("TCL_SHARED") or os.path.join(os.path.dirname(ROOT), "shared")
# Autotuning takes seconds per process; tests force each variant explicitly instead.
os.environ.setdefault("TCL_NO_AUTOTUNE", "1")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


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
        return get_runtime(os.environ.get("TCL_TEST_DEVICE", "cpu"))
    except DeviceError as e:
        try:
            return get_runtime(None)
        except DeviceError:
            pytest.skip(f"no OpenCL device: {e}")


@pytest.fixture(scope="session")
def clbe(rt):
    from transfercl_cli.backends import CLBackend

    return CLBackend(rt)


@pytest.fixture
def npbe():
    from transfercl_cli.backends import NumpyBackend

    return NumpyBackend()
