"""Kernel variants for mobile GPUs (issue 18) and how a device gets them: the GEMM without local memory for devices
whose local memory is emulated (Mali), the 8-channel BatchNorm kernels on GPUs; both run on PoCL here too (the
Oclgrind runs in test_oclgrind.py check them again, with bounds and race checks)."""
import numpy as np
import pytest

from tests.helpers import check_op, make_node
from transfercl_cli.ops import cl_elementwise, cl_gemm


class _Dev:
    def __init__(self, local_type):
        self.local_mem_type = local_type


class _Info:
    def __init__(self, name, platform):
        self.name, self.platform_name, self.id = name, platform, "9:9"


class _Rt:
    def __init__(self, is_cpu, local_type, name="Some GPU", platform="Vendor"):
        self.is_cpu, self.device, self.info = is_cpu, _Dev(local_type), _Info(name, platform)


def test_default_gemm_variant_by_device_kind_and_local_memory():
    import pyopencl as cl

    LOCAL, GLOBAL = cl.device_local_mem_type.LOCAL, cl.device_local_mem_type.GLOBAL
    assert cl_gemm.default_variant(_Rt(True, GLOBAL)) == "cpu14x32"  # PoCL reports CL_GLOBAL too: CPUs stay CPU
    assert cl_gemm.default_variant(_Rt(False, LOCAL)) == "gpu"
    assert cl_gemm.default_variant(_Rt(False, GLOBAL)) == "gpu_direct"  # local memory emulated in global memory
    assert cl_gemm.default_variant(_Rt(False, LOCAL, "Mali-G78 r0p0", "ARM Platform")) == "gpu_direct"


def test_gpu_autotune_candidates_include_the_variants_without_local_memory():
    import pyopencl as cl

    cands = cl_gemm._candidates(_Rt(False, cl.device_local_mem_type.LOCAL))
    assert cands[0] == "gpu" and {"gpu2", "gpu_direct", "gpu_direct8"} <= set(cands)
    assert not any(cl_gemm.VARIANTS[c]["kind"] == "cpu" for c in cands)
    cpu = cl_gemm._candidates(_Rt(True, cl.device_local_mem_type.GLOBAL))
    assert all(cl_gemm.VARIANTS[c]["kind"] == "cpu" for c in cpu)


def test_simulator_is_not_timed(monkeypatch):
    rt = _Rt(False, None, "Oclgrind Simulator", "Oclgrind")
    rt.is_oclgrind = True
    monkeypatch.delenv("TCL_NO_AUTOTUNE", raising=False)
    monkeypatch.setattr(cl_gemm, "_autotune", lambda rt: pytest.fail("timed on a simulator"))
    assert cl_gemm.tuned_variant(rt) == "gpu"


def test_batchnorm_channels_per_work_item(monkeypatch):
    assert cl_elementwise.bn_cw(_Rt(True, None)) == cl_elementwise.BN_CW == 32
    assert cl_elementwise.bn_cw(_Rt(False, None)) == cl_elementwise.BN_CW_PORTABLE == 8
    monkeypatch.setattr(cl_elementwise, "BN_PORTABLE", True)
    assert cl_elementwise.bn_cw(_Rt(True, None)) == 8


@pytest.mark.parametrize("portable", [True, False], ids=["8-channel", "32-channel"])
@pytest.mark.parametrize("attrs", [{}, {"act": "relu6"}, {"pool": "global_avg", "keepdims": True}],
                         ids=["plain", "relu6", "pool"])
@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_widths_match_the_reference(npbe, clbe, monkeypatch, portable, attrs, training):
    monkeypatch.setattr(cl_elementwise, "BN_PORTABLE", portable)
    rng = np.random.default_rng(3)
    C = 45  # 32 + 8 + 5 or 5 x 8 + 5: wide body, 8-channel chunks and the scalar tail
    params = {"mean": rng.standard_normal(C) * 0.5, "var": rng.uniform(0.5, 2.0, C),
              "gamma": rng.uniform(2.0, 5.0, C), "beta": rng.standard_normal(C)}
    node = make_node("batchnorm", attrs=dict({"eps": 1e-3, "momentum": 0.9}, **attrs), params=params)
    x = (rng.standard_normal((2, 3, 5, C)) * 3 + 1).astype(np.float32)
    check_op(npbe, clbe, node, [x], training=training)
