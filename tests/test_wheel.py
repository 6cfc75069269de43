"""The built wheel carries the OpenCL sources: install it into a fresh virtual environment and run a kernel."""
import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_wheel_contains_kernels_and_runs_one(tmp_path, rt):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    ROOT], check=True, cwd=tmp_path)
    whl = glob.glob(str(dist / "transfercl-*.whl"))
    assert len(whl) == 1
    import zipfile

    names = zipfile.ZipFile(whl[0]).namelist()
    for cl in glob.glob(os.path.join(ROOT, "kernels", "*.cl")) + glob.glob(os.path.join(ROOT, "kernels", "*.h")):
        assert f"transfercl_cli/kernels/{os.path.basename(cl)}" in names
    venv = tmp_path / "venv"
    # The fresh environment reuses this interpreter's site-packages for the heavy dependencies only through pip's
    # resolver (already-downloaded wheels); transfercl itself comes from the wheel alone.
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    subprocess.run([py, "-m", "pip", "install", "-q", whl[0]], check=True, cwd=tmp_path)
    code = (
        "import numpy as np, transfercl_cli, os\n"
        "from transfercl_cli.runtime import get_runtime, kernel_source\n"
        "assert 'site-packages' in transfercl_cli.__file__, transfercl_cli.__file__\n"
        "rt = get_runtime('cpu'); x = np.arange(5, dtype=np.float32); y = np.ones(5, np.float32)\n"
        "dx, dy = rt.to_device(x), rt.to_device(y)\n"
        "rt.launch(rt.kernel('selftest', 'saxpy'), (5,), None, np.int32(5), np.float32(2), dx, dy)\n"
        "assert '#define VLD16' in kernel_source('gemm')  # the shared header, substituted from the wheel\n"
        "print(rt.to_host(dy).tolist())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    out = subprocess.run([py, "-c", code], check=True, cwd=tmp_path, capture_output=True, text=True, env=env)
    assert out.stdout.strip() == str([1.0, 3.0, 5.0, 7.0, 9.0])
    tcl = subprocess.run([str(venv / "bin" / "tcl"), "--version"], capture_output=True, text=True, env=env)
    assert tcl.returncode == 0 and "0.1.0" in tcl.stdout
