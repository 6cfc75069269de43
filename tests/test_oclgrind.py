"""Every kernel on the Oclgrind OpenCL 1.2 simulator (issue 18), with its API, out-of-bounds and data-race checks on.

tests/oclgrind_cases.py (small cases that launch every kernel) and the runtime, elementwise, conv, optim and
executor test files run in subprocesses whose device is Oclgrind (tests/conftest.py: oclgrind_env, not registered
system-wide), each with the GPU-style and with the CPU-style kernel variants. A run passes when its tests pass and
Oclgrind printed no diagnostic (it prints them on stderr and carries on, so the results alone would not show them);
the case runs together must have launched every kernel of kernels/*.cl. Skips without the oclgrind package
(`apt-get install oclgrind`; .ci/run installs it). Oclgrind's uninitialised-value check is not used: besides needing
-cl-opt-disable (it aborts on LLVM's freeze instruction) and missing clEnqueueFillBuffer's writes, in 21.10 it flags
inputs of ops that run after buffers were recycled through tcl's pool, while each of those ops alone is clean.
"""
import concurrent.futures
import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT, oclgrind_available, oclgrind_env

pytestmark = [pytest.mark.oclgrind,
              pytest.mark.skipif(not oclgrind_available(), reason="oclgrind is not installed (Debian: apt-get install "
                                 "oclgrind; .ci/run installs it when run as root)")]

STYLES = ("gpu", "cpu")
TARGETS = {
    "cases": ["tests/oclgrind_cases.py"],
    "suite": ["tests/test_runtime.py", "tests/test_ops_elementwise.py", "tests/test_ops_conv.py", "tests/test_optim.py",
              "tests/test_executor.py", "tests/test_replay.py"],
}
RUNS = [(s, t) for s in STYLES for t in TARGETS]  # the GPU style is the slow one: it goes first
TIMEOUT_S = 900

# pyopencl asks every device for CL_DEVICE_COMPUTE_CAPABILITY_MAJOR_NV (0x4000) when it builds a program, without
# checking for the NVIDIA extension first; Oclgrind's API check reports the CL_INVALID_VALUE. Not tcl's call.
# And test_runtime.py builds a broken program on purpose; a kernel that fails to build fails its test anyway.
BENIGN = [re.compile(r"Oclgrind - OpenCL runtime error detected\n\s*Function: clGetDeviceInfo\n\s*Error:\s*"
                     r"CL_INVALID_VALUE\n\s*For argument 'param_name'"),
          re.compile(r"Oclgrind - OpenCL runtime error detected\n\s*Function: clBuildProgram\n\s*Error:\s*"
                     r"CL_BUILD_PROGRAM_FAILURE")]


def oclgrind_diagnostics(text):
    """Oclgrind's error and warning reports in a process's output, as text blocks (benign ones left out).

    A report is a line at column 0 followed by tab-indented detail lines starting with Kernel: or Function: (e.g.
    'Invalid read of size 4 at global memory address ...' / '\\tKernel: gemm_gpu'), or any line that starts with
    'Oclgrind' (runtime errors and fatal messages)."""
    for pat in BENIGN:
        text = pat.sub("", text)
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line or line[0].isspace():
            continue
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if line.startswith("Oclgrind") or re.match(r"\t(Kernel|Function):", nxt):
            block = [line]
            for d in lines[i + 1:i + 8]:
                if d and not d[0].isspace():
                    break
                block.append(d)
            out.append("\n".join(block).rstrip())
    return out


def kernels_in_sources():
    """'file:kernel' for every __kernel function in kernels/*.cl."""
    kdir = os.path.join(ROOT, "kernels")
    out = set()
    for f in sorted(os.listdir(kdir)):
        if f.endswith(".cl"):
            with open(os.path.join(kdir, f)) as fh:
                src = fh.read()
            out |= {f"{f[:-3]}:{m}" for m in re.findall(r"__kernel\s+(?:\w+\s+)*?void\s+(\w+)\s*\(", src)}
    return out


def _run(args, env, timeout=TIMEOUT_S):
    p = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{(style, target): (returncode, output, kernels launched)} on Oclgrind, two runs at a time (one core each)."""
    base = tmp_path_factory.mktemp("oclgrind")

    def one(run):
        style, target = run
        env = oclgrind_env(str(base / "vendors"))
        cov = base / f"coverage-{style}-{target}.json"
        env.update(TCL_TEST_STYLE=style, TCL_OCLGRIND_COVERAGE=str(cov), OCLGRIND_NUM_THREADS="1",
                   TCL_CACHE_DIR=str(base / f"cache-{style}-{target}"))
        rc, out = _run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider"] + TARGETS[target], env)
        launched = set(json.loads(cov.read_text())) if cov.exists() else set()
        return rc, out, launched

    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        return dict(zip(RUNS, ex.map(one, RUNS)))


def test_checks_catch_planted_bugs(tmp_path):
    """The harness sees Oclgrind's reports: an out-of-bounds read and a local-memory data race are found."""
    script = tmp_path / "planted.py"
    script.write_text('''
import numpy as np, pyopencl as cl
p = [p for p in cl.get_platforms() if "Oclgrind" in p.name][0]
ctx = cl.Context([p.get_devices()[0]]); q = cl.CommandQueue(ctx)
prg = cl.Program(ctx, """
__kernel void oob(__global const float* x, __global float* y) { int i = get_global_id(0); y[i] = x[i + 1]; }
__kernel void race(__global float* y) {
    __local float t[1];
    t[0] = (float)get_local_id(0);
    barrier(CLK_LOCAL_MEM_FENCE);
    y[get_global_id(0)] = t[0];
}""").build()
x = cl.Buffer(ctx, cl.mem_flags.READ_ONLY | cl.mem_flags.COPY_HOST_PTR, hostbuf=np.ones(8, np.float32))
y = cl.Buffer(ctx, cl.mem_flags.READ_WRITE, 32)
prg.oob(q, (8,), (8,), x, y); prg.race(q, (8,), (8,), y); q.finish()
''')
    rc, out = _run([sys.executable, str(script)], oclgrind_env(str(tmp_path / "vendors")), timeout=120)
    assert rc == 0, out[-3000:]
    found = oclgrind_diagnostics(out)
    assert any(d.startswith("Invalid read") and "Kernel: oob" in d for d in found), out[-3000:]
    assert any("data race" in d.split("\n")[0] and "Kernel: race" in d for d in found), out[-3000:]
    assert not any("clGetDeviceInfo" in d for d in found)  # pyopencl's probe is left out


@pytest.mark.parametrize("run", RUNS, ids=[f"{s}-{t}" for s, t in RUNS])
def test_kernels_pass_on_oclgrind_without_diagnostics(runs, run):
    rc, out, launched = runs[run]
    style, target = run
    found = oclgrind_diagnostics(out)
    assert not found, (f"Oclgrind reported {len(found)} problem(s) running {' '.join(TARGETS[target])} with the "
                       f"{style}-style variants:\n" + "\n\n".join(found[:10]))
    assert rc == 0, f"{' '.join(TARGETS[target])} failed on Oclgrind ({style} style):\n{out[-6000:]}"
    assert target != "cases" or launched, "no kernel launch was recorded"


def test_every_kernel_ran_on_oclgrind(runs):
    launched = set().union(*(runs[(s, "cases")][2] for s in STYLES))
    missing = sorted(kernels_in_sources() - launched)
    assert not missing, f"kernels never launched by tests/oclgrind_cases.py: {missing}"
