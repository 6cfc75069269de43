"""The GEMM every matrix-shaped op runs on (1x1 convolutions, Dense, im2col convolutions and their gradients).

    gemm(rt, a, b, out=None, *, trans_a=False, trans_b=False, accumulate=False, alpha=1.0, bias=None, act=None)
        out[M, N] = [out +] alpha * op(a) @ op(b) [+ bias[N]] [+ residual], then act (None, 'relu', 'relu6'); float32.

Also the `dense` op of the opencl backend.
"""
import os
import time

import numpy as np

from . import register

# Fused activations (kernels/fused_act.h). Only the first two have a gradient from the output (act_masked);
# plan.fold_frozen fuses the others only where no gradient flows.
_ACT = {None: 0, "linear": 0, "relu": 1, "relu6": 2, "swish": 3, "sigmoid": 4, "hard_swish": 5, "hard_sigmoid": 6}
DIFFERENTIABLE_ACTS = {None: 0, "linear": 0, "relu": 1, "relu6": 2}


def act_defines(code):
    """Build options for a kernel whose epilogue applies fused activation `code`: codes 3..6 (exp, hard-swish)
    live in their own programs (kernels/fused_act.h, EPI_EXP) so that the common ones stay lean."""
    return {"EPI_EXP": 1} if int(code) >= 3 else {}


def grad_act_code(act, where):
    """The act code of a fused activation that a backward pass goes through; an error for one it cannot."""
    if act not in DIFFERENTIABLE_ACTS:
        raise ValueError(f"{where}: the fused activation {act!r} has no gradient here (plan.fold_frozen fuses it only "
                         "where none flows)")
    return DIFFERENTIABLE_ACTS[act]


def _as2d(x):
    """Leading dims fold into rows: an NHWC activation (N,H,W,C) is an (N*H*W, C) matrix (a free view)."""
    if x.ndim == 2:
        return x
    if x.ndim == 1:
        return x.reshape(1, x.shape[0])
    return x.reshape(-1, x.shape[-1])


def gemm(rt, a, b, out=None, *, trans_a=False, trans_b=False, accumulate=False, alpha=1.0, bias=None, act=None,
         variant=None, b_packs=None, residual=None):
    """out = [out +] alpha * op(a) @ op(b) [+ bias] [+ residual] then act; returns out (allocated (M, N) when not
    given).

    `residual`: a tensor of out's size added before the activation (a frozen convolution's residual Add, fused by
    plan.fold_frozen): in the CPU kernel's epilogue, a separate pass on the other paths.

    `variant` forces an implementation (tests); by default the per-device autotuned one runs.
    `b_packs`: a dict owned by the caller for a B that does not change while the dict lives (a frozen layer's
    weight, Backend.const_cache): the CPU path keeps B's packed panels in it, packed on first use, instead of
    reading B in place or packing it on every call.
    """
    a2, b2 = _as2d(a), _as2d(b)
    M, Ka = (a2.shape[1], a2.shape[0]) if trans_a else a2.shape
    Kb, N = (b2.shape[1], b2.shape[0]) if trans_b else b2.shape
    if Ka != Kb:
        raise ValueError(f"gemm: inner dimensions differ: op(a) is {M}x{Ka}, op(b) is {Kb}x{N}")
    K = Ka
    if act not in _ACT:
        raise ValueError(f"gemm: unknown activation {act!r}")
    if out is None:
        if accumulate:
            raise ValueError("gemm: accumulate=True needs an existing out")
        out = rt.empty((M, N))
    elif out.size != M * N:
        raise ValueError(f"gemm: out has shape {out.shape}, expected {M}x{N} elements")
    if bias is not None and bias.size != N:
        raise ValueError(f"gemm: bias has {bias.size} elements, expected {N}")
    if residual is not None and (accumulate or residual.size != M * N):
        raise ValueError(f"gemm: a residual of {residual.size} elements (out has {M}x{N}) with accumulate={accumulate}")
    if M == 0 or N == 0:
        return out
    cfg = _resolve(rt, variant)
    small = (variant is None and cfg["kind"] == "cpu" and M <= SMALL_M and not (trans_a or trans_b or accumulate)
             and alpha == 1.0)
    if residual is not None and (small or cfg["kind"] != "cpu"):
        gemm(rt, a, b, out, trans_a=trans_a, trans_b=trans_b, alpha=alpha, bias=bias, variant=variant, b_packs=b_packs)
        return add_residual(rt, out, residual, act)
    if small:
        _gemm_small_m(rt, a2, b2, out, M, N, K, bias, _ACT[act], b_packs)
        return out
    if variant is None and cfg["kind"] == "cpu":
        cfg = _shape_variant(cfg, M, N, K, trans_a, trans_b)
    if cfg["kind"] == "naive":
        _gemm_naive(rt, a2, b2, out, M, N, K, trans_a, trans_b, accumulate, alpha, bias, _ACT[act])
        return out
    if cfg["kind"] == "gpu":
        _gemm_gpu(rt, cfg, a2, b2, out, M, N, K, trans_a, trans_b, accumulate, alpha, bias, _ACT[act])
        return out
    if cfg["kind"] == "gpu_direct":
        _gemm_gpu_direct(rt, cfg, a2, b2, out, M, N, K, trans_a, trans_b, accumulate, alpha, bias, _ACT[act])
        return out
    _gemm_cpu(rt, cfg, a2, b2, out, M, N, K, trans_a, trans_b, accumulate, alpha, bias, _ACT[act],
              tune=variant is None and _online_tuning(), b_packs=None if trans_b else b_packs, residual=residual)
    return out


def add_residual(rt, y, residual, act):
    """y = act(y + residual) in place, in separate passes: the fused residual Add where a kernel's epilogue does not
    take one (GPU GEMMs, direct and depthwise convolutions)."""
    from .cl_elementwise import act_forward, binary

    if tuple(residual.shape) != tuple(y.shape):
        residual = residual.reshape(tuple(y.shape))
    binary(rt, "add", y, residual, out=y)
    if _ACT[act]:  # the same names as the elementwise kernels'; the fused hard-sigmoid is PyTorch's (1/6, 1/2)
        p0, p1 = (1 / 6, 0.5) if act == "hard_sigmoid" else (0.0, 0.0)
        act_forward(rt, act, y, out=y, p0=p0, p1=p1)
    return y


# Implementations and their tile parameters. "cpu*": float16 register blocks of MR rows x 16*NV columns per
# work-item over packed or in-place panels (CPU OpenCL); "gpu", "gpu2": local-memory tiles of (16*WPT)^2 for real
# GPUs; "gpu_direct*": RM x 4 register blocks read straight from global memory, no local memory or barriers (mobile
# GPUs: Mali emulates local memory in global memory); "naive": one item per output (reference). `tune`: timed by
# the autotuner on devices of that kind (CPU variants on CPUs, the others on GPUs).
VARIANTS = {
    "naive": dict(kind="naive"),
    "cpu14x32": dict(kind="cpu", MR=14, NV=2, tune=True),
    "cpu8x32": dict(kind="cpu", MR=8, NV=2, tune=True),
    "cpu6x64": dict(kind="cpu", MR=6, NV=4),
    "cpu8x48": dict(kind="cpu", MR=8, NV=3),
    "cpu8x16": dict(kind="cpu", MR=8, NV=1),
    "gpu": dict(kind="gpu", LS=16, WPT=4, tune=True),
    "gpu2": dict(kind="gpu", LS=16, WPT=2, tune=True),
    "gpu_direct": dict(kind="gpu_direct", RM=4, tune=True),
    "gpu_direct8": dict(kind="gpu_direct", RM=8, tune=True),
}
GPU_KINDS = ("gpu", "gpu_direct")
AUTOTUNE_ENV = "TCL_NO_AUTOTUNE"
_TUNE_SHAPE = (3136, 512, 256)  # (M, K, N): a mid-size pointwise convolution (0.8 GFLOP)
_TUNE_BUDGET_S = 3.0
# Alternating rounds (each candidate's best time kept): with 4, a loaded host made 14 x 32 win over 8 x 32 in 1 of 3
# runs (2.98 / 3.78 ms; unloaded 1.81 / 1.90), and MobileNetV2 then ran 6-9% slower. 15 rounds take ~0.3 s here.
_TUNE_ROUNDS = 15
_PLAN_VERSION = 1  # bump when the Python side of a variant changes what the cached choice means
_TUNED = {}  # device id -> variant name, for this process


NARROW_N = 256  # below this many columns the block width is chosen by the columns it computes (_shape_variant)
NARROW_NV1_COST = 1.8  # a 16-column block's cost per column against wider blocks' (its B vector feeds one FMA per
# broadcast of A): 1568x672x112 took 945 us in 8 x 16 blocks, 584 in 8 x 32 ones (128 columns), 25088x24x72 464 / 372


def _shape_variant(cfg, M, N, K, trans_a, trans_b):
    """The tuned CPU variant, or wider register blocks (6 x 64) where they were faster here (PoCL, 2 cores,
    MobileNet shapes, fwd/dgrad at N <= 512: 5-15% less time): fewer column blocks, so each A row is broadcast
    from fewer work-items. With a transposed A (weight gradients) the tall 14 x 32 blocks stayed ahead.

    Narrow outputs (the 16-240 channels of MobileNetV2/V3 and EfficientNet's layers) take the block width that
    computes the fewest columns, padding included, a 16-column block's counted NARROW_NV1_COST times: N = 16 ran
    8 x 16 blocks in half the time of 6 x 64 ones (a quarter of whose columns were real), N = 24 and 144 the
    14 x 32 and 8 x 48 ones 1.3-1.8x faster (bench/bench_gemm.py --shapes); N = 80 and 112 the 8 x 32 ones
    1.4-1.6x faster than 8 x 16 (which pad less but feed one FMA per broadcast of A). Ties keep the earlier
    candidate. (4 x 80 blocks were faster on some N = 72-80 shapes alone, 2.5x slower on MobileNetV3-Small's
    3136x16x72 in the network: not a candidate.)"""
    if trans_a:
        return cfg
    base = VARIANTS["cpu6x64"] if N <= 512 and M >= 1024 else cfg
    if N >= NARROW_N:
        return base

    def cost(c):
        nr = 16 * int(c["NV"])
        return _cdiv(N, nr) * nr * (NARROW_NV1_COST if nr == 16 else 1.0)

    return min([base, cfg, VARIANTS["cpu8x48"], VARIANTS["cpu8x16"]], key=cost)


def default_variant(rt):
    """The choice without timing (TCL_NO_AUTOTUNE=1, or when tuning fails): by device type, and on GPUs by whether
    local memory is real (CL_DEVICE_LOCAL_MEM_TYPE: Mali and other mobile GPUs report CL_GLOBAL, emulated)."""
    if getattr(rt, "is_cpu", False):
        return "cpu14x32"
    return "gpu_direct" if local_memory_emulated(rt) else "gpu"


def local_memory_emulated(rt):
    """True when the device reports its local memory as global memory (CL_GLOBAL) or is an ARM Mali GPU."""
    dev = getattr(rt, "device", None)
    try:
        import pyopencl as cl

        if dev.local_mem_type == cl.device_local_mem_type.GLOBAL:
            return True
    except Exception:  # noqa: BLE001 - a device (or test double) that cannot say
        pass
    info = getattr(rt, "info", None)
    names = f"{getattr(info, 'name', '')} {getattr(info, 'platform_name', '')}".lower()
    return "mali" in names


def _source_hash():
    import hashlib

    from ..runtime import kernel_source

    return hashlib.sha256((kernel_source("gemm") + f"|plan{_PLAN_VERSION}").encode()).hexdigest()[:16]


def tuned_variant(rt):
    """The variant for this device: cached per device+driver+kernel source, else timed once (well under 5 s)."""
    dev = rt.info.id
    name = _TUNED.get(dev)
    if name is not None:
        return name
    import os

    from .. import tuning

    if os.environ.get(AUTOTUNE_ENV, "") not in ("", "0"):
        return default_variant(rt)  # not remembered: the variable may be unset later in this process
    if getattr(rt, "is_oclgrind", False):
        return default_variant(rt)  # a simulator: its timings mean nothing, and a tuning GEMM would take hours
    else:
        key = tuning.device_key(rt, "gemm", _source_hash())
        got = tuning.get(rt, key)
        if isinstance(got, dict) and got.get("variant") in VARIANTS and got.get("complete", True):
            name = got["variant"]
        else:
            name, times = _autotune(rt)
            # Cold kernel builds can eat the time budget before every candidate ran: then the choice is kept for
            # this process only and the next process (its builds now cached by the driver) tunes again.
            complete = all(n in times for n in _candidates(rt))
            tuning.put(rt, key, {"variant": name, "seconds": times, "shape": list(_TUNE_SHAPE),
                                 "complete": complete})
    _TUNED[dev] = name
    return name


def _candidates(rt):
    """Variants worth timing on this device, the untimed default first (its build is needed anyway)."""
    first = default_variant(rt)
    kinds = ("cpu",) if getattr(rt, "is_cpu", False) else GPU_KINDS
    return [first] + [n for n, c in VARIANTS.items() if c["kind"] in kinds and c.get("tune") and n != first]


def _autotune(rt):
    """Time the candidates on the tuning shape: build and warm each, then alternate them for a few rounds (so
    load from other processes hits all alike) and keep each one's best time. Stops early at the time budget."""
    t_start = time.perf_counter()
    cands = _candidates(rt)
    M, K, N = _TUNE_SHAPE
    rng = np.random.default_rng(0)
    a = rt.to_device(rng.standard_normal((M, K), dtype=np.float32))
    b = rt.to_device(rng.standard_normal((K, N), dtype=np.float32))
    out = rt.empty((M, N))
    times = {}
    try:
        for _ in range(_TUNE_ROUNDS):
            for name in cands:
                if name in times and times[name] == float("inf"):
                    continue
                if name not in times and times and time.perf_counter() - t_start > _TUNE_BUDGET_S:
                    continue  # out of time before trying it: not a candidate this time
                try:
                    t = float(_time_variant(rt, name, a, b, out))
                except Exception:  # a variant that does not build or run here is simply not chosen
                    t = float("inf")
                times[name] = min(times.get(name, t), t)
            if time.perf_counter() - t_start > _TUNE_BUDGET_S:
                break
    finally:
        for t in (a, b, out):
            t.release()
    finite = {k: v for k, v in times.items() if v != float("inf")}
    best = min(finite, key=finite.get) if finite else cands[0]
    return best, {k: (round(v, 6) if v != float("inf") else None) for k, v in times.items()}


def _time_variant(rt, name, a, b, out):
    """One timed run (seconds) of a variant on the tuning operands, after a first call that builds and warms it."""
    key = (rt.info.id, name)
    if key not in _WARM:
        gemm(rt, a, b, out, variant=name)
        rt.finish()
        _WARM.add(key)
    t0 = time.perf_counter()
    gemm(rt, a, b, out, variant=name)
    rt.finish()
    return time.perf_counter() - t0


_WARM = set()


def _resolve(rt, variant):
    if isinstance(variant, dict):
        return variant
    if variant is None:
        variant = tuned_variant(rt)
    if isinstance(variant, str) and variant.startswith("{"):
        import ast

        return ast.literal_eval(variant)
    try:
        return VARIANTS[variant]
    except KeyError:
        raise ValueError(f"gemm: unknown variant {variant!r}; known: {', '.join(VARIANTS)}") from None


_PK = 256  # k values per work-item of the packing kernels (PK in gemm.cl)


def _cdiv(a, b):
    return -(-a // b)


# Per-shape tuning while training runs: training repeats the same few GEMM shapes thousands of times, and how many
# row blocks a work-item should take (gi) or how long its k chunks are (kb) depends on the shape in ways the plan's
# cache model does not capture (the weight gradient of conv_pw_13 at batch 163 ran 11% faster with
# 4x the row blocks, smaller ones 5% slower). Once a shape has proved to repeat, its next calls alternate a few such
# plans, timed; then the fastest median is kept for the process. Short jobs (an evaluation, a benchmark's few steps)
# never tune. Only the blocking varies, never kc, so every candidate sums in the same order: results are
# bit-identical, and the candidates' scratch buffers have about the default plan's sizes (the pool reuses them).
SHAPE_TUNE_MIN_FLOP = 2e8  # smaller GEMMs keep the plan (the finish around a timed call would cost too much)
SHAPE_TUNE_AFTER = 20  # calls of a shape with the default plan before tuning starts
SHAPE_TUNE_CALLS = 3  # timed calls per candidate (0: no per-shape tuning)
_SHAPE_TUNERS = {}


def _online_tuning():
    return os.environ.get(AUTOTUNE_ENV, "") in ("", "0")


class _ShapeTuner:
    def __init__(self, plans):
        self.plans = plans
        self.times = [[] for _ in plans]
        self.seen = 0
        self.calls = 0
        self.best = None if len(plans) > 1 else 0

    def pick(self):
        """Index of the plan for this call, and whether to time it."""
        if self.best is not None:
            return self.best, False
        self.seen += 1
        if self.seen <= SHAPE_TUNE_AFTER:
            return 0, False
        return self.calls % len(self.plans), True

    def record(self, i, seconds):
        self.times[i].append(seconds)
        self.calls += 1
        if self.calls >= SHAPE_TUNE_CALLS * len(self.plans):
            self.best = int(np.argmin([np.median(t) for t in self.times]))


def shape_plan_candidates(plan, nbi):
    """The default plan and its variations tried by the per-shape tuner: 4x and 2x the row blocks per work-item, one
    k chunk per split. The same kc and packing, so the same summation order and about the same scratch sizes (reading
    A in place instead was 1.2-2x slower on the shapes where the plan packs it, and packing it where the plan does not
    would add an A-sized buffer to the pool)."""
    out = [plan]
    for ov in ({"gi": min(nbi, 64, plan["gi"] * 4)}, {"gi": min(nbi, 64, plan["gi"] * 2)}, {"kb": plan["kc"]}):
        p = dict(plan, **ov)
        if p not in out:
            out.append(p)
    return out


def shape_tuning_state(rt, cfg, M, N, K, trans_a, trans_b):
    """(plans, times per plan, chosen index or None) of the per-shape tuner, for benchmarks and tests."""
    t = _SHAPE_TUNERS.get(_tuner_key(rt, cfg, M, N, K, trans_a, trans_b))
    return None if t is None else (t.plans, t.times, t.best)


def _tuner_key(rt, cfg, M, N, K, trans_a, trans_b):
    return (rt.info.id, tuple(sorted((k, v) for k, v in cfg.items() if k != "tune")), M, N, K, trans_a, trans_b)


def _gemm_cpu(rt, cfg, a, b, out, M, N, K, trans_a, trans_b, accumulate, alpha, bias, act, tune=False, b_packs=None,
              residual=None):
    i32 = np.int32
    MR, NV = int(cfg["MR"]), int(cfg["NV"])
    NR = 16 * NV
    nbi, nbj = _cdiv(M, MR), _cdiv(N, NR)
    plan = _cpu_plan(cfg, M, N, K, trans_a, trans_b)
    tuner = None
    if tune and SHAPE_TUNE_CALLS and 2.0 * M * N * K >= SHAPE_TUNE_MIN_FLOP:
        key = _tuner_key(rt, cfg, M, N, K, trans_a, trans_b)
        tuner = _SHAPE_TUNERS.get(key)
        if tuner is None:
            tuner = _SHAPE_TUNERS[key] = _ShapeTuner(shape_plan_candidates(plan, nbi))
        pick, timed = tuner.pick()
        plan = tuner.plans[pick]
        if timed:
            rt.finish()
            t0 = time.perf_counter()
        else:
            tuner = None
    apack = plan["apack"]
    defs = dict({"MR": MR, "NV": NV}, **act_defines(act))
    kern = lambda name: rt.kernel("gemm", name, defs)  # noqa: E731  (one program per configuration)
    scratch = []
    if apack:
        ap = rt.empty((nbi * K * MR,))
        scratch.append(ap)
        if trans_a:  # rows of a (= columns of A) are contiguous: stream them
            rt.launch(kern("gemm_pack_a_rows"), (_cdiv(nbi, 16), _cdiv(K, 16)), (1, 1), i32(M), i32(K), a, i32(M),
                      ap)
        else:
            rt.launch(kern("gemm_pack_a"), (nbi, _cdiv(K, _PK)), (1, 1), i32(M), i32(K), a, i32(K), i32(1), ap)
        a, ars, aks, a_bs = ap, 1, MR, K * MR
    else:
        lda = a.shape[1]
        ars, aks = (1, lda) if trans_a else (lda, 1)
        a_bs = MR * ars
    nb_direct = plan["nb_direct"]
    npk = nbj - nb_direct
    bp = b
    if b_packs is not None:  # every column block from panels packed once (the same sums as in place)
        bp, nb_direct, npk = packed_panels(rt, b, K, N, NR, b_packs), 0, 0
    if npk:
        bp = rt.empty((npk * K * NR,))
        scratch.append(bp)
        if trans_b:
            rt.launch(kern("gemm_pack_b"), (npk, _cdiv(K, _PK)), (1, 1), i32(N - nb_direct * NR), i32(K), b, i32(K),
                      i32(1), bp, i32(nb_direct))
        else:
            rt.launch(kern("gemm_pack_b_rows"), (_cdiv(npk, 16), _cdiv(K, 16)), (1, 1), i32(N - nb_direct * NR),
                      i32(K), b, i32(N), bp, i32(nb_direct))
    kc, kb, gi = plan["kc"], plan["kb"], plan["gi"]
    nsplit = _cdiv(K, kc)
    nwi = _cdiv(nbi, gi) * nbj
    target = out
    if nsplit > 1:
        target = rt.empty((nbi * nbj * nsplit * MR * NR,))
        scratch.append(target)
    sc = out
    if kc > kb:  # running sums between k chunks
        sc = rt.empty((nwi * nsplit * gi * MR * NR,))
        scratch.append(sc)
    bias_arg = bias if bias is not None else out
    acc_code = i32(2 if residual is not None else int(accumulate))  # 2: add `residual` (gemm.cl STORE_TILE)
    res_arg = residual if residual is not None else out
    rt.launch(kern("gemm_cpu"), (nwi, nsplit, 1), (1, 1, 1), i32(M), i32(N), i32(K), i32(kc), i32(kb), a, i32(ars),
              i32(aks), np.int64(a_bs), b, i32(N), i32(nb_direct), bp, target, np.float32(alpha), acc_code, res_arg,
              bias_arg, i32(bias is not None), i32(act), i32(nsplit > 1), i32(gi), sc, *_NO_BATCH)
    if nsplit > 1:
        rt.launch(kern("gemm_reduce"), (nbj, nbi), (1, 1), i32(M), i32(N), i32(nsplit), target, out,
                  np.float32(alpha), acc_code, res_arg, bias_arg, i32(bias is not None), i32(act))
    for t in scratch:
        t.release()  # later commands on the in-order queue run after this GEMM: reusing the buffers is safe
    if tuner is not None:
        rt.finish()
        tuner.record(pick, time.perf_counter() - t0)


_NO_BATCH = (np.int64(0),) * 4  # gemm_cpu's batch strides for a single GEMM


def batched_config(rt, M, N, K):
    """The CPU variant that gemm_batched_panels would run Z GEMMs of M x N x K with (its NR = 16 * NV is the width
    of the B panels the caller prepares), or None on devices without the CPU variant."""
    cfg = _resolve(rt, None)
    if cfg["kind"] != "cpu":
        return None
    return _shape_variant(cfg, M, N, K, False, False)


def gemm_batched_panels(rt, cfg, a, bp, out, Z, M, N, K):
    """out[z] (M x N) = a[z] (M x K, row-major) @ B[z] for z < Z, one launch (grid dimension 2 = z), where bp holds
    every B[z] as the packed panels of cfg's width (gemm_cpu's layout: bp[z][jb][K][NR], zero past N), made by the
    caller (Winograd's weight transform). No bias, activation or K split: the caller's epilogue follows."""
    i32 = np.int32
    MR, NR = int(cfg["MR"]), 16 * int(cfg["NV"])
    nbi, nbj = _cdiv(M, MR), _cdiv(N, NR)
    plan = _cpu_plan(dict(cfg, apack=0, pack="all", kc=K), M, N, K, False, False)
    kb, gi = plan["kb"], plan["gi"]
    nwi = _cdiv(nbi, gi) * nbj
    sc, sc_zs = out, 0
    if K > kb:  # running sums between k chunks, one scratch area per GEMM
        sc_zs = nwi * gi * MR * NR
        sc = rt.empty((Z * sc_zs,))
    k = rt.kernel("gemm", "gemm_cpu", {"MR": MR, "NV": int(cfg["NV"])})
    rt.launch(k, (nwi, 1, Z), (1, 1, 1), i32(M), i32(N), i32(K), i32(K), i32(kb), a, i32(K), i32(1),
              np.int64(MR * K), a, i32(N), i32(0), bp, out, np.float32(1.0), i32(0), out, out, i32(0), i32(0), i32(0),
              i32(gi), sc, np.int64(M * K), np.int64(nbj * K * NR), np.int64(M * N), np.int64(sc_zs))
    if sc is not out:
        sc.release()
    return out


_AUX = {"GEMM_GPU_ONLY": 1}  # the small kernels build without the CPU variant's code
_GPU_LS = {}  # (device, LS, WPT) -> work-group edge that the built kernel accepts


def _gemm_gpu(rt, cfg, a, b, out, M, N, K, trans_a, trans_b, accumulate, alpha, bias, act):
    i32 = np.int32
    wpt = int(cfg.get("WPT", 4))
    want = int(cfg.get("LS", 16))
    ck = (rt.info.id, want, wpt)
    ls = _GPU_LS.get(ck)
    if ls is None:
        # Work-group of ls x ls items within the device's and the built kernel's limits.
        ls = want
        while ls > 1 and ls * ls > rt.max_work_group_size:
            ls //= 2
        while ls > 1:
            kern = rt.kernel("gemm", "gemm_gpu", dict({"GEMM_GPU_ONLY": 1, "LS": ls, "WPT": wpt}, **act_defines(act)))
            if rt.local_size(ls * ls, kern) >= ls * ls and min(rt.info.max_work_item_sizes[:2]) >= ls:
                break
            ls //= 2
        _GPU_LS[ck] = ls
    kern = rt.kernel("gemm", "gemm_gpu", dict({"GEMM_GPU_ONLY": 1, "LS": ls, "WPT": wpt}, **act_defines(act)))
    ts = ls * wpt
    sai, sak = (1, M) if trans_a else (K, 1)
    sbk, sbj = (1, K) if trans_b else (N, 1)
    rt.launch(kern, (_cdiv(N, ts) * ls, _cdiv(M, ts) * ls), (ls, ls), i32(M), i32(N), i32(K), a, i32(sai), i32(sak),
              b, i32(sbk), i32(sbj), out, np.float32(alpha), i32(int(accumulate)),
              bias if bias is not None else out, i32(bias is not None), i32(act))


def _gemm_gpu_direct(rt, cfg, a, b, out, M, N, K, trans_a, trans_b, accumulate, alpha, bias, act):
    i32 = np.int32
    rm = int(cfg.get("RM", 4))
    kern = rt.kernel("gemm", "gemm_gpu_direct", dict({"GEMM_GPU_ONLY": 1, "RM": rm}, **act_defines(act)))
    sai, sak = (1, M) if trans_a else (K, 1)
    sbk, sbj = (1, K) if trans_b else (N, 1)
    rt.launch(kern, (_cdiv(N, 4), _cdiv(M, rm)), None, i32(M), i32(N), i32(K), a, i32(sai), i32(sak), b, i32(sbk),
              i32(sbj), out, np.float32(alpha), i32(int(accumulate)), bias if bias is not None else out,
              i32(bias is not None), i32(act))


def cpu_test_configs():
    """CPU-variant configurations that together take every code path (tests): packed and in-place A and B,
    K split into chunks, work orders, register blocks whose width exceeds small N."""
    return [
        dict(kind="cpu", MR=8, NV=2, apack=1, pack="all", kc=64, gi=3),
        dict(kind="cpu", MR=8, NV=2, apack=0, pack="none", kc=100, gi=1000),
        dict(kind="cpu", MR=6, NV=4, apack=0, pack="auto", kc=0, gi=1),
        dict(kind="cpu", MR=6, NV=4, apack=1, pack="none", kc=33, gi=2),
    ]


def _cpu_plan(cfg, M, N, K, trans_a, trans_b):
    """Shape-dependent choices for the CPU variant (entries of cfg override them):
    apack   pack A into panels, else read it in place;
    nb      column blocks of B read in place (the rest from packed panels);
    kb      k chunk within a work-item: a KB x NR piece of B stays in L1 while the work-item's row blocks use it;
    gi      row blocks per work-item (their A rows, GI x MR x K floats, stay in L2 for the neighbouring items);
    kc      K split across work-items (partials summed by gemm_reduce): for parallelism, and so that a long K
            does not push a work-item's A rows out of L2."""
    MR, NR = int(cfg["MR"]), 16 * int(cfg["NV"])
    # Byte budgets (per core here: 48 KiB L1, 2 MiB L2): a B chunk in L1; a work-item's A rows in L2, to at most
    # L2_MAX before K is split.
    L1_B, L2_A, L2_MAX = 32 << 10, 128 << 10, 512 << 10
    nbi, nbj = _cdiv(M, MR), _cdiv(N, NR)
    apack = cfg.get("apack")
    if apack is None:
        # In place, a transposed A is read in short pieces far apart (TLB, cache lines half used) and a row-major
        # one as MR rows whose stride maps them all to one L1 set (a multiple of 4 KiB): pack those.
        apack = 1 if (trans_a and M >= 256) or (not trans_a and MR > 8 and K % 1024 == 0) else 0
    pack = cfg.get("pack", "auto")
    if trans_b or pack == "all":
        nb = 0
    elif pack == "none":
        nb = N // NR
    else:  # packing B pays when many row blocks reuse it
        nb = N // NR if M < 512 else 0
    kb = int(cfg.get("kb") or max(16, L1_B // (4 * NR)))
    gi, kc = cfg.get("gi"), cfg.get("kc")
    if gi is None or kc is None:
        gmin = min(nbi, 4)
        if kc is None:
            kc = K if gmin * MR * K * 4 <= L2_MAX else max(kb, L2_MAX // (gmin * MR * 4) // kb * kb)
        kc = max(1, min(int(kc) or K, K))
        if gi is None:
            gi = min(nbi, 64, max(gmin, L2_A // (MR * kc * 4)))
            while gi > 1 and _cdiv(nbi, gi) * nbj * _cdiv(K, kc) < 16:  # enough work-items for all cores
                gi = max(1, gi // 2)
            # Groups of equal size (7 row blocks as 3 + 2 + 2, not 3 + 3 + 1): PoCL hands each thread a contiguous
            # part of the grid, whose slowest dimension here is the row group, so one short group left a thread
            # idle (49 x 400 x 400, RegNetX's 7 x 7 x 400 convolutions at batch 1).
            gi = _cdiv(nbi, _cdiv(nbi, gi))
        if cfg.get("kc") is None and _cdiv(nbi, gi) * nbj * _cdiv(K, kc) < 8 and K >= 4 * kb:
            kc = max(kb, _cdiv(_cdiv(K, 8), kb) * kb)
        if cfg.get("kc") is None:
            # Splits of equal length: PoCL hands each thread a contiguous half of the grid, and the split index is
            # its slowest dimension, so with K = 4608 cut at 4096 one thread got every long split (49 x 4608 x 512,
            # ResNet's 7 x 7 x 512 convolution at batch 1: 1.72 ms; cut at 2304: 0.91 ms).
            kc = _cdiv(_cdiv(K, _cdiv(K, kc)), kb) * kb
    kc = max(1, min(int(kc) or K, K))
    if cfg.get("kb") is None:  # equal chunks: a short last chunk would cost a scratch round trip for little work
        kb = _cdiv(kc, _cdiv(kc, kb))
    return {"apack": int(apack), "nb_direct": int(nb), "kc": kc, "kb": max(1, kb), "gi": max(1, int(gi))}


SMALL_M = 8  # up to this many rows (a dense layer's batch) the CPU path runs gemm_small_m


def _gemm_small_m(rt, a, b, out, M, N, K, bias, act, b_packs=None):
    """Rows M <= SMALL_M, row-major A and B read in place, or B's 16-column panels from b_packs (gemm.cl
    gemm_small_m; SM, its row count, is the next power of two, so four programs cover every M)."""
    sm = 1 << (int(M) - 1).bit_length()
    k = rt.kernel("gemm", "gemm_small_m", dict({"SM": sm}, **act_defines(act)))
    i32 = np.int32
    bp = packed_panels(rt, b, K, N, 16, b_packs) if b_packs is not None and N >= 16 else b
    rt.launch(k, (_cdiv(N, 16),), (1,), i32(M), i32(N), i32(K), a, b, out, bias if bias is not None else out,
              i32(bias is not None), i32(act), bp, i32(bp is not b))


def packed_panels(rt, b, K, N, NR, packs):
    """B (K x N, row-major) as NR-column panels of K x NR floats (zero-padded), kept in `packs` under NR: packed on
    the first call, returned as they are after. Panels read as one contiguous stream per column block: a weight
    read in place (K rows N floats apart) ran at half the speed when it was not in L2 (49 x 160 x 960, MobileNetV2
    at batch 1: 194 -> 99 us; its 1280 -> 1000 classifier at batch 1, 537 -> 140-300 us)."""
    bp = packs.get(("panels", NR))
    if bp is None:
        nbj = _cdiv(N, NR)
        bp = rt.empty((nbj * K * NR,))
        rt.launch(rt.kernel("gemm", "gemm_pack_b_rows", {"MR": 8, "NV": NR // 16}), (_cdiv(nbj, 16), _cdiv(K, 16)),
                  (1, 1), np.int32(N), np.int32(K), b, np.int32(N), bp, np.int32(0))
        packs[("panels", NR)] = bp
    return bp


def _gemm_naive(rt, a, b, out, M, N, K, trans_a, trans_b, accumulate, alpha, bias, act):
    k = rt.kernel("gemm", "gemm_naive", dict(_AUX, **act_defines(act)))
    sai, sak = (1, M) if trans_a else (K, 1)
    sbk, sbj = (1, K) if trans_b else (N, 1)
    i32 = np.int32
    ls = rt.local_size(16, k)
    rt.launch(k, (N, M), (ls, 1), i32(M), i32(N), i32(K), a, i32(sai), i32(sak), b, i32(sbk), i32(sbj), out,
              np.float32(alpha), i32(1 if accumulate else 0), bias if bias is not None else out,
              i32(0 if bias is None else 1), i32(act))


def colsum(rt, g, out=None, accumulate=False):
    """out[N] = [out +] sum over rows of g (leading dims folded into rows)."""
    g2 = _as2d(g)
    M, N = g2.shape
    if out is None:
        if accumulate:
            raise ValueError("colsum: accumulate=True needs an existing out")
        out = rt.empty((N,))
    i32 = np.int32
    k = rt.kernel("gemm", "colsum", _AUX)
    ls = rt.local_size(16, k)
    # Long columns are cut into row chunks so that enough work-items run (and read neighbouring addresses).
    nparts = max(1, min(_cdiv(M, 256), _cdiv(4096, max(N, 1))))
    rows = _cdiv(M, nparts)
    nparts = _cdiv(M, rows)
    if nparts == 1:
        rt.launch(k, (N, 1), (ls, 1), i32(M), i32(N), i32(rows), g2, out, i32(int(accumulate)))
        return out
    part = rt.empty((nparts, N))
    rt.launch(k, (N, nparts), (ls, 1), i32(M), i32(N), i32(rows), g2, part, i32(0))
    k2 = rt.kernel("gemm", "colsum_parts", _AUX)
    rt.launch(k2, (N,), (rt.local_size(16, k2),), i32(N), i32(nparts), part, out, i32(int(accumulate)))
    part.release()
    return out


# ---------------------------------------------------------------------------------------------------------------
# dense: y = x @ W + b, then act


@register("opencl", "dense")
def dense_fwd(be, node, xs, training):
    x = xs[0]
    rt = be.rt
    w = be.param(node, "weight")
    bias = be.param(node, "bias") if be.has_param(node, "bias") else None
    act = node.attrs.get("act")
    y = gemm(rt, x, w, rt.empty(tuple(x.shape[:-1]) + (w.shape[1],)), bias=bias, act=act,
             b_packs=be.const_cache(node, "weight"))
    # x (and y, for a fused activation's gradient) stay alive for the backward: the executor pins what it holds.
    return [y], (x, y if DIFFERENTIABLE_ACTS.get(act, 0) else None)


@register("opencl", "dense", "backward")
def dense_bwd(be, node, saved, gys, need):
    x, y = saved
    rt = be.rt
    gy = gys[0]
    act = node.attrs.get("act")
    w = be.param(node, "weight")
    g = act_masked(rt, gy, y, act, "dense") if _ACT.get(act, 0) else gy
    tmp = g if g is not gy else None
    gx = None
    if need.inputs and need.inputs[0]:
        gx = rt.empty(x.shape)
        gemm(rt, g.reshape(-1, g.shape[-1]), w, gx, trans_b=True)
    grads = {}
    if need.params:
        grads["weight"] = gemm(rt, x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]), rt.empty(w.shape),
                               trans_a=True)
        if be.has_param(node, "bias"):
            grads["bias"] = colsum(rt, g)
    if tmp is not None:
        tmp.release()  # queued release is safe: the in-order queue finishes readers before the buffer is reused
    return [gx], grads


def act_masked(rt, gy, y, act, where):
    """gy through a fused activation's derivative, read from its output y (cl_elementwise.act_masked): a new tensor,
    or gy itself without an activation; an error for an activation without a gradient from y."""
    code = grad_act_code(act, where)
    if not code:
        return gy
    from .cl_elementwise import act_masked as masked

    return masked(rt, y, gy, {1: "relu", 2: "relu6"}[code])


def shape_tuner_warmup_calls():
    """How many calls of one large GEMM shape the per-shape tuner takes before it settles on a plan (benchmarks warm
    up this many times so that they time what training would use)."""
    return SHAPE_TUNE_AFTER + SHAPE_TUNE_CALLS * 4
