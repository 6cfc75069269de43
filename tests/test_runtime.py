import os

import numpy as np
import pytest

from transfercl_cli import runtime
from transfercl_cli.errors import DeviceError
from transfercl_cli.runtime import parse_selector, select_device


class FakeDev:
    def __init__(self, pi, di, name, typ, platform="Fake Platform"):
        self.platform_index, self.device_index = pi, di
        self.id = f"{pi}:{di}"
        self.name, self.type, self.platform_name = name, typ, platform


DEVS = [FakeDev(0, 0, "pthread-Intel Xeon", "cpu", "Portable Computing Language"),
        FakeDev(1, 0, "QUALCOMM Adreno(TM) 740", "gpu", "QUALCOMM Snapdragon(TM)"),
        FakeDev(1, 1, "Mali-G78", "gpu", "ARM Platform")]


@pytest.mark.parametrize("spec,expected", [
    ("0:1", ("index", (0, 1))), ("2", ("index", (0, 2))), ("GPU", ("type", "gpu")), ("cpu", ("type", "cpu")),
    ("pocl", ("name", "pocl")), ("Adreno", ("name", "adreno")), ("numpy", ("numpy", None)), ("", ("default", None)),
])
def test_parse_selector(spec, expected):
    assert parse_selector(spec) == expected


def test_select_default_prefers_gpu(monkeypatch):
    monkeypatch.delenv("TCL_DEVICE", raising=False)
    assert select_device(None, DEVS).name.startswith("QUALCOMM")
    assert select_device(None, DEVS[:1]).type == "cpu"


def test_select_by_index_type_name_and_env(monkeypatch):
    assert select_device("1:1", DEVS).name == "Mali-G78"
    assert select_device("cpu", DEVS).id == "0:0"
    assert select_device("adreno", DEVS).id == "1:0"
    assert select_device("portable", DEVS).id == "0:0"  # platform names match too
    monkeypatch.setenv("TCL_DEVICE", "mali")
    assert select_device(None, DEVS).id == "1:1"
    assert select_device("numpy", DEVS) is None


@pytest.mark.parametrize("spec", ["3:0", "accelerator", "nvidia"])
def test_select_errors_name_the_devices(spec):
    with pytest.raises(DeviceError) as e:
        select_device(spec, DEVS)
    msg = str(e.value)
    assert "0:0" in msg and "1:1" in msg and "tcl devices" in msg


def test_no_platform_is_a_clear_error(monkeypatch):
    import pyopencl as cl

    def boom():
        raise cl.LogicError("clGetPlatformIDs", cl.status_code.PLATFORM_NOT_FOUND_KHR, "no platforms")

    monkeypatch.setattr(cl, "get_platforms", boom)
    with pytest.raises(DeviceError) as e:
        runtime.list_devices()
    assert "pocl-binary-distribution" in str(e.value) and "Termux" in str(e.value)


def test_kernel_runs_and_matches_numpy(rt):
    rng = np.random.default_rng(0)
    for n in (1, 7, 1000):
        x = rng.standard_normal(n).astype(np.float32)
        y = rng.standard_normal(n).astype(np.float32)
        dx, dy = rt.to_device(x), rt.to_device(y)
        k = rt.kernel("selftest", "saxpy")
        rt.launch(k, (n,), None, np.int32(n), np.float32(2.5), dx, dy)
        np.testing.assert_allclose(rt.to_host(dy), 2.5 * x.astype(np.float64) + y, rtol=1e-6, atol=1e-6)
        dx.release()
        dy.release()


def test_build_failure_reports_log(rt, monkeypatch):
    monkeypatch.setattr(runtime, "kernel_source", lambda name: "__kernel void broken( { this is not C }")
    with pytest.raises(DeviceError) as e:
        rt.program("definitely_broken_for_test", {"X": 1})
    assert "failed to build" in str(e.value) and "definitely_broken_for_test" in str(e.value)


def test_program_cached_within_process(rt):
    p1 = rt.program("selftest", {"UNUSED": 3})
    p2 = rt.program("selftest", {"UNUSED": 3})
    assert p1 is p2
    assert rt.program("selftest", {"UNUSED": 4}) is not p1


def test_pocl_cache_dir_is_set():
    assert os.environ.get("POCL_CACHE_DIR")
    assert os.path.isdir(os.environ["POCL_CACHE_DIR"])


def test_buffer_pool_reuses_buffers(rt):
    a = rt.empty((123, 45))
    buf = a.buf
    a.release()
    before = rt.allocated_bytes
    b = rt.empty((45, 123))  # same byte size
    assert b.buf is buf and rt.allocated_bytes == before
    b.release()


def test_buffer_pool_serves_a_smaller_request_from_a_free_buffer_up_to_a_quarter_larger(rt):
    from transfercl_cli.runtime import Runtime

    rt = Runtime(rt.info)  # an empty pool of its own
    big = rt.empty((1000, 1001))
    buf, cap = big.buf, big.capacity
    big.release()
    before = rt.allocated_bytes
    small = rt.empty((850, 1001))
    assert small.buf is buf and small.capacity == cap and rt.allocated_bytes == before
    x = np.arange(small.size, dtype=np.float32).reshape(small.shape)
    rt.to_device(x, out=small)
    np.testing.assert_array_equal(small.get(), x)  # copies move nbytes, not the buffer's size
    small.release()  # back under the buffer's own size
    again = rt.empty((1000, 1001))
    assert again.buf is buf
    tiny = rt.empty((700, 1001))  # the free buffer would be 43% larger: a new buffer
    assert tiny.buf is not buf
    again.release()
    tiny.release()


def test_device_array_reshape_and_roundtrip(rt):
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    d = rt.to_device(x)
    np.testing.assert_array_equal(d.reshape(6, -1).get(), x.reshape(6, 4))
    with pytest.raises(ValueError):
        d.reshape(5, 5)
    d.release()


def test_binary_cache_path_depends_on_inputs(rt):
    a = rt._binary_cache_path("src", ["-DA=1"])
    assert a != rt._binary_cache_path("src", ["-DA=2"]) and a != rt._binary_cache_path("src2", ["-DA=1"])


def test_half_storage_roundtrip_matches_ieee_half_rounding(rt):
    # precision: fp16 keeps saved activations as IEEE half (vstore_half: round to nearest even), in place.
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(0, 3, 1000), [70000.0, -1e-6, 1e-8, 0.0, 65504.0, 2.0 ** -24]]).astype(np.float32)
    x = x[: 1000 + 5]  # an odd length: the scalar tail runs too
    from transfercl_cli.runtime import Runtime

    rt = Runtime(rt.info)  # an empty pool of its own: the half buffer is exactly half
    d = rt.to_device(x)
    before = rt.allocated_bytes
    assert rt.to_half(d) and d.half and d.capacity == max(x.size * 2, 4)
    assert not rt.to_half(d)  # already half
    rt.to_float(d)
    assert not d.half and d.capacity >= x.nbytes
    with np.errstate(over="ignore"):  # 70000 is past half's range: inf, as the device gives
        want = x.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(d.get(), want)
    assert rt.allocated_bytes <= before + x.size * 2 + 4
    d.release()


def test_default_choice_skips_a_device_whose_compiler_fails(monkeypatch):
    # Two PoCLs on one machine: PyPI's (LLVM 14) cannot compile for an AMD Zen 5, Debian's can.
    monkeypatch.delenv("TCL_DEVICE", raising=False)
    devs = [FakeDev(0, 0, "pthread-AMD EPYC", "cpu", "Portable Computing Language"),
            FakeDev(1, 0, "pthread-skylake-avx512-AMD EPYC", "cpu", "Portable Computing Language")]
    monkeypatch.setattr(runtime, "compiler_error",
                        lambda d: "error: unknown target CPU 'generic'" if d.id == "0:0" else None)
    assert select_device(None, devs).id == "1:0"
    assert select_device("cpu", devs).id == "1:0"
    assert select_device("0:0", devs).id == "0:0"  # an explicit choice stays the user's
    monkeypatch.setattr(runtime, "compiler_error", lambda d: "error: boom")
    assert select_device(None, devs).id == "0:0"  # none compiles: the first, whose build error then explains


def test_build_failure_fix_names_the_cause():
    assert "pocl-opencl-icd" in runtime.build_failure_fix("Build on <dev>:\nerror: unknown target CPU 'generic'")
    assert "driver or kernel bug" in runtime.build_failure_fix("error: use of undeclared identifier 'x'")


def test_the_chosen_device_compiles(rt):
    assert runtime.compiler_error(rt.info) is None
