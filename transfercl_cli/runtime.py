"""OpenCL runtime: device selection, kernel programs (built once, cached across processes) and device arrays.

Every OpenCL op in tcl goes through one `Runtime`: it owns the context and the in-order queue, builds the
`kernels/*.cl` sources with `-D` options, and hands out float32 `DeviceArray`s from a pool so that a training
step that repeats the same shapes allocates nothing.
"""
import contextlib
import functools
import hashlib
import math
import os
import re
import threading
from collections import defaultdict

import numpy as np

from .errors import DeviceError

KERNEL_PACKAGE = "transfercl_cli.kernels"
DEVICE_ENV = "TCL_DEVICE"


def cache_dir(*parts):
    """Per-user cache directory (XDG), created on demand."""
    base = os.environ.get("TCL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "transfercl"
    )
    d = os.path.join(base, *parts)
    os.makedirs(d, exist_ok=True)
    return d


def _setup_pocl_cache():
    # PoCL caches compiled kernels itself; give it a writable per-user directory when the user has not chosen one.
    if "POCL_CACHE_DIR" not in os.environ:
        try:
            os.environ["POCL_CACHE_DIR"] = cache_dir("pocl")
        except OSError:
            pass


_setup_pocl_cache()

NO_PLATFORM_FIX = (
    "On Linux x86_64 install the PoCL CPU platform with `pip install pocl-binary-distribution`; on Android/Termux "
    "install `ocl-icd` and point LD_LIBRARY_PATH at the vendor OpenCL library (see the README section 'Android / "
    "Termux'); run `tcl devices` to see what is found. As a slow fallback without OpenCL use `--device numpy`."
)


def _import_cl():
    try:
        import pyopencl as cl  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise DeviceError(f"pyopencl cannot be imported ({e}).", "Install it with `pip install pyopencl`.") from e
    return cl


@functools.lru_cache(maxsize=None)
def _kernel_files():
    """{file name: path or resource} of the kernels/*.cl sources (installed package first, then the source tree)."""
    try:
        from importlib import resources

        files = {p.name: p for p in resources.files(KERNEL_PACKAGE).iterdir() if p.name.endswith((".cl", ".h"))}
        if files:
            return files
    except (ModuleNotFoundError, FileNotFoundError, OSError):
        pass
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    return {f: os.path.join(here, f) for f in os.listdir(here) if f.endswith((".cl", ".h"))}


def kernel_names():
    """Stems of every kernels/*.cl file, sorted."""
    return sorted(f[:-3] for f in _kernel_files() if f.endswith(".cl"))


def _read_kernel_file(fname):
    f = _kernel_files().get(fname)
    if f is None:
        raise FileNotFoundError(f"kernels/{fname}")
    if isinstance(f, str):
        with open(f) as fh:
            return fh.read()
    return f.read_text()


_INCLUDE = re.compile(r'^#include "([\w.]+\.h)"[^\n]*$', re.M)


def kernel_source(name):
    """The text of kernels/NAME.cl, from the installed package (wheel) or the source tree, with each
    `#include "X.h"` of a kernels/ header replaced by its text (one shared copy; no include path to pass, which a
    zipped or relocated package would make awkward)."""
    fname = name if name.endswith(".cl") else name + ".cl"
    return _INCLUDE.sub(lambda m: _read_kernel_file(m.group(1)), _read_kernel_file(fname))


# ---------------------------------------------------------------------------------------------------------------
# Devices


class DeviceInfo:
    """What `tcl devices` shows about one OpenCL device, and its selector id."""

    def __init__(self, pi, di, platform, device):
        cl = _import_cl()
        self.platform_index = pi
        self.device_index = di
        self.platform = platform
        self.device = device
        self.id = f"{pi}:{di}"
        self.platform_name = platform.name.strip()
        self.name = device.name.strip()
        t = device.type
        self.type = (
            "gpu" if t & cl.device_type.GPU else "cpu" if t & cl.device_type.CPU else "accelerator"
            if t & cl.device_type.ACCELERATOR else "other"
        )
        self.compute_units = device.max_compute_units
        self.global_mem = device.global_mem_size
        self.local_mem = device.local_mem_size
        self.max_alloc = device.max_mem_alloc_size
        self.max_work_group_size = device.max_work_group_size
        self.max_work_item_sizes = list(device.max_work_item_sizes)
        try:
            self.opencl_c_version = device.opencl_c_version.strip()
        except Exception:  # pragma: no cover - OpenCL 1.0 devices
            self.opencl_c_version = "OpenCL C 1.0"
        ext = device.extensions
        self.fp16 = "cl_khr_fp16" in ext
        self.fp64 = "cl_khr_fp64" in ext
        self.driver_version = device.driver_version.strip()
        self.version = device.version.strip()

    def as_dict(self):
        return {
            "id": self.id, "platform": self.platform_name, "name": self.name, "type": self.type,
            "compute_units": self.compute_units, "global_mem_bytes": self.global_mem,
            "local_mem_bytes": self.local_mem, "max_alloc_bytes": self.max_alloc,
            "max_work_group_size": self.max_work_group_size, "opencl_c_version": self.opencl_c_version,
            "fp16": self.fp16, "fp64": self.fp64, "driver_version": self.driver_version,
        }


def list_devices():
    """All OpenCL devices on all platforms, as DeviceInfo. Raises DeviceError when there is no platform."""
    cl = _import_cl()
    try:
        platforms = cl.get_platforms()
    except cl.Error as e:  # pyopencl raises when the ICD loader finds no platform
        raise DeviceError(f"No OpenCL platform was found ({e}).", NO_PLATFORM_FIX) from e
    out = []
    for pi, p in enumerate(platforms):
        try:
            devs = p.get_devices()
        except cl.Error:
            continue
        for di, d in enumerate(devs):
            out.append(DeviceInfo(pi, di, p, d))
    if not out:
        raise DeviceError("OpenCL platforms were found but none has a usable device.", NO_PLATFORM_FIX)
    return out


def parse_selector(spec):
    """Classify a device selector: ('index', (p, d)), ('type', 'gpu'), ('numpy', None) or ('name', text)."""
    s = str(spec).strip()
    if not s:
        return ("default", None)
    low = s.lower()
    if low in ("numpy", "reference", "none"):
        return ("numpy", None)
    if low in ("gpu", "cpu", "accelerator"):
        return ("type", low)
    parts = s.split(":")
    if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
        return ("index", (int(parts[0]), int(parts[1])))
    if s.isdigit():
        return ("index", (0, int(s)))
    return ("name", low)


def select_device(spec=None, devices=None):
    """Pick a device by selector (see parse_selector); default: `$TCL_DEVICE`, else the first GPU, else the first CPU.

    Returns a DeviceInfo, or None for the numpy fallback.
    """
    if spec is None or str(spec).strip() == "":
        spec = os.environ.get(DEVICE_ENV, "")
    kind, val = parse_selector(spec)
    if kind == "numpy":
        return None
    devices = devices if devices is not None else list_devices()
    ids = ", ".join(f"{d.id} ({d.name}, {d.type})" for d in devices)
    if kind == "default":
        for want in ("gpu", "cpu"):
            d = _first_that_compiles([d for d in devices if d.type == want])
            if d is not None:
                return d
        return devices[0]
    if kind == "type":
        d = _first_that_compiles([d for d in devices if d.type == val])
        if d is not None:
            return d
        raise DeviceError(
            f"No OpenCL device of type '{val}' was found; the devices are: {ids}.",
            "Choose one with --device ID (or the TCL_DEVICE variable), or run `tcl devices`.",
        )
    if kind == "index":
        for d in devices:
            if (d.platform_index, d.device_index) == val:
                return d
        raise DeviceError(
            f"There is no OpenCL device {val[0]}:{val[1]}; the devices are: {ids}.",
            "Use one of those ids with --device (or TCL_DEVICE), or run `tcl devices`.",
        )
    for d in devices:
        if val in d.name.lower() or val in d.platform_name.lower():
            return d
    raise DeviceError(
        f"No OpenCL device matches '{spec}'; the devices are: {ids}.",
        "Pass an id such as 0:0, a type (gpu, cpu), or part of a platform or device name to --device "
        "(or TCL_DEVICE); `tcl devices` lists them.",
    )


def _first_that_compiles(candidates):
    """The first candidate whose OpenCL compiler builds a trivial kernel, else the first candidate (whose build error
    then explains itself), else None. Probed only when there is a choice: a machine can hold two PoCLs, PyPI's (LLVM
    14, which cannot compile for processors newer than it, such as AMD Zen 5) and the distribution's."""
    if len(candidates) > 1:
        for d in candidates:
            if compiler_error(d) is None:
                return d
    return candidates[0] if candidates else None


_COMPILER_ERRORS = {}
_PROBE_SRC = "__kernel void probe(__global float *a) { a[get_global_id(0)] += 1.0f; }"


def compiler_error(info):
    """None if the device's compiler builds a trivial kernel, else its build log (once per device and process)."""
    key = (info.platform_name, info.name, info.id)
    if key not in _COMPILER_ERRORS:
        device = getattr(info, "device", None)
        if device is None:  # a test's stand-in
            return None
        cl = _import_cl()
        try:
            cl.Program(cl.Context([device]), _PROBE_SRC).build(options=["-cl-std=CL1.2"])
            _COMPILER_ERRORS[key] = None
        except cl.Error as e:
            _COMPILER_ERRORS[key] = str(e).strip() or type(e).__name__
    return _COMPILER_ERRORS[key]


# What LLVM's build log says when it does not know the processor (PyPI's PoCL on a CPU newer than its LLVM).
UNKNOWN_CPU = "unknown target CPU"


def build_failure_fix(log, otherwise=None):
    """The fix to name for an OpenCL build failure, from its log: a compiler that does not know this processor is
    the installation's fault, not a kernel's (`otherwise`: the fix for any other failure)."""
    if UNKNOWN_CPU in log:
        return ("The OpenCL platform's compiler does not know this processor (its LLVM is older than the CPU: PyPI's "
                "PoCL 3.0 ships LLVM 14, which cannot compile for AMD Zen 4/5 and other recent CPUs). Install your "
                "distribution's PoCL, which tcl then finds and prefers (Debian/Ubuntu: `sudo apt-get install "
                "pocl-opencl-icd`; Fedora: `sudo dnf install pocl`), or choose another device with --device; "
                "`tcl doctor` checks every device.")
    return otherwise or ("This is a driver or kernel bug: run `tcl doctor`, try another device with --device, and "
                         "report the build log above.")


# ---------------------------------------------------------------------------------------------------------------
# Device arrays


def pool_fit(free_sizes, nbytes):
    """The pool's reuse rule: among the sizes of free buffers, `nbytes` itself, else the smallest up to a quarter
    larger (the pattern of sizes repeats every training step, so close sizes share); None: allocate a new one."""
    if nbytes in free_sizes:
        return nbytes
    fits = [k for k in free_sizes if nbytes < k <= nbytes + nbytes // 4]
    return min(fits) if fits else None


class DeviceArray:
    """A float32 (or int32) array in device memory: an OpenCL buffer plus its shape. Row-major, no offset."""

    __slots__ = ("rt", "buf", "shape", "dtype", "nbytes", "capacity", "_pooled", "half")

    def __init__(self, rt, buf, shape, dtype=np.float32, pooled=False, capacity=None):
        self.rt = rt
        self.buf = buf
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.nbytes = math.prod(self.shape) * self.dtype.itemsize  # math.prod: np.prod costs ~5 us a call
        self.capacity = max(self.nbytes, 4) if capacity is None else capacity  # the buffer's size (>= nbytes)
        self._pooled = pooled
        self.half = False  # the values wait in a half-precision buffer (Runtime.to_half); no kernel may read them

    @property
    def size(self):
        return self.nbytes // self.dtype.itemsize

    @property
    def ndim(self):
        return len(self.shape)

    def reshape(self, *shape):
        """A view with another shape over the same buffer (no copy)."""
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        shape = list(shape)
        if -1 in shape:
            i = shape.index(-1)
            rest = math.prod(int(s) for j, s in enumerate(shape) if j != i)
            shape[i] = self.size // max(rest, 1)
        if math.prod(int(s) for s in shape) != self.size:
            raise ValueError(f"cannot reshape {self.shape} to {tuple(shape)}")
        return DeviceArray(self.rt, self.buf, shape, self.dtype, pooled=False, capacity=self.capacity)

    def get(self):
        return self.rt.to_host(self)

    def release(self):
        """Return the buffer to the runtime's pool (only arrays that came from the pool)."""
        if self._pooled:
            self.rt.pool_release(self)
            self._pooled = False

    def __repr__(self):
        return f"DeviceArray(shape={self.shape}, dtype={self.dtype.name})"


class Runtime:
    """One OpenCL device: context, queue, kernel programs and a buffer pool."""

    def __init__(self, info):
        cl = _import_cl()
        self.cl = cl
        self.info = info
        self.device = info.device
        try:
            self.ctx = cl.Context([self.device])
            self.queue = cl.CommandQueue(self.ctx)
        except cl.Error as e:
            raise DeviceError(
                f"The OpenCL device {info.id} ({info.name}) could not be opened ({e}).",
                "Check the driver with `tcl devices`, or choose another device with --device.",
            ) from e
        self._programs = {}
        self._kernels = {}
        self._origin = {}  # id(kernel) -> (program, kernel name)
        self._declared = set()  # id() of the kernels whose scalar argument types pyopencl knows (launch)
        self._pool = defaultdict(list)
        self._lock = threading.Lock()
        self.max_work_group_size = int(self.device.max_work_group_size)
        self.is_cpu = info.type == "cpu"
        self.is_pocl = "portable computing language" in info.platform_name.lower() or "pocl" in info.platform_name.lower()
        self.is_oclgrind = "oclgrind" in info.platform_name.lower()
        self.allocated_bytes = 0
        self.peak_bytes = 0
        self.returned = []  # (buffer, capacity) pairs given back outside the pool's lock (replay.Replay.__del__)
        self._rec = None  # a replay.Recorder while an inference pass is recorded: told every command and allocation

    # -- programs ------------------------------------------------------------------------------------------------
    def program(self, name, defines=None, options=()):
        """Build (once per process, and cached across processes) kernels/NAME.cl with -D defines."""
        opts = [f"-D{k}={v}" for k, v in sorted((defines or {}).items())] + list(options)
        # Full precision is required for the numpy-matching tests; no fast-math. TCL_POCL: the kernels' vector
        # loads and stores are written element by element (see the top of kernels/gemm.cl). TCL_CL_OPTIONS: extra
        # options for every build (the Oclgrind tests add -cl-opt-disable for its uninitialised-value check).
        # -cl-denorms-are-zero: values below FLT_MIN (1.2e-38) may be flushed to zero, as TensorFlow does on CPUs
        # and most GPUs do anyway. On x86 every FMA that meets a denormal takes a microcode assist: a saturated
        # squeeze-excite gate (sigmoid(-90) ~ 1e-39) left 1-2% denormals in EfficientNet-B0's activations, and its
        # next convolution ran 3x slower (batch 1 kernels: 9.75 -> 6.09 ms with the flag, PoCL flushes them).
        opts += ["-cl-std=CL1.2", "-cl-denorms-are-zero"] + (["-DTCL_POCL=1"] if self.is_pocl else [])
        opts += os.environ.get("TCL_CL_OPTIONS", "").split()
        key = (name, tuple(opts))
        prg = self._programs.get(key)
        if prg is not None:
            return prg
        src = kernel_source(name)
        prg = self._build(name, src, opts)
        self._programs[key] = prg
        return prg

    def _binary_cache_path(self, src, opts):
        h = hashlib.sha256()
        for part in (self.info.name, self.info.platform_name, self.info.driver_version, src, " ".join(opts)):
            h.update(part.encode())
            h.update(b"\0")
        return os.path.join(cache_dir("programs"), h.hexdigest() + ".bin")

    def _build(self, name, src, opts):
        cl = self.cl
        # PoCL keeps its own kernel cache (POCL_CACHE_DIR); other platforms get program binaries stored by us, except
        # Oclgrind, which rebuilds a binary without the build options (checks would silently change).
        use_bin = not self.is_pocl and not self.is_oclgrind and os.environ.get("TCL_NO_BINARY_CACHE") is None
        path = self._binary_cache_path(src, opts) if use_bin else None
        if path and os.path.exists(path):
            try:
                with open(path, "rb") as f:
                    prg = cl.Program(self.ctx, [self.device], [f.read()]).build(options=opts)
                return prg
            except (cl.Error, OSError):
                pass
        try:
            with _build_hint(self):
                prg = cl.Program(self.ctx, src).build(options=opts)
        except cl.Error as e:
            # pyopencl puts the compiler's build log into the exception text.
            raise DeviceError(
                f"The OpenCL kernels in {name}.cl failed to build for {self.info.name} with options "
                f"{' '.join(opts)}: {str(e).strip()[:4000]}",
                build_failure_fix(str(e)),
            ) from e
        if path:
            try:
                from .fsutil import atomic_path

                with atomic_path(path) as tmp:
                    with open(tmp, "wb") as f:
                        f.write(prg.binaries[0])
            except OSError:
                pass
        return prg

    def kernel(self, name, kernel_name, defines=None):
        """A kernel object from kernels/NAME.cl (one per process and option set)."""
        key = (name, kernel_name, tuple(sorted((defines or {}).items())))
        k = self._kernels.get(key)
        if k is None:
            prg = self.program(name, defines)
            k = getattr(prg, kernel_name)
            self._kernels[key] = k
            self._origin[id(k)] = (prg, kernel_name)  # kept alive by _kernels: the id stays this kernel's
        return k

    def kernel_copy(self, kernel):
        """A new kernel object for the same function (its own arguments), or None for one not from `kernel`."""
        origin = self._origin.get(id(kernel))
        # From the pyopencl Program wrapper: a raw program would be probed for attributes by name, which a strict
        # runtime (Oclgrind) reports as clCreateKernel errors.
        return self.cl.Kernel(*origin) if origin is not None else None

    def launch(self, kernel, gsize, lsize, *args):
        """Queue a kernel (no wait). Scalars must already be numpy scalars (np.int32, np.float32)."""
        cl = self.cl
        vals = [a.buf if isinstance(a, DeviceArray) else a for a in args]
        # pyopencl packs numpy-scalar arguments through a generic path (~25 us a launch on PoCL, more than the
        # enqueue itself); with the scalars' dtypes declared it packs them with struct (~0.5 us). Declared on a
        # kernel's first launch; a later launch whose types differ fails to pack (struct refuses a float for an
        # int, pyopencl a number for a buffer) and declares again.
        if id(kernel) not in self._declared:
            self._declare_args(kernel, vals)
        try:
            kernel.set_args(*vals)
        except Exception:
            self._declare_args(kernel, vals)
            kernel.set_args(*vals)
        gsize = tuple(map(int, gsize))
        if lsize is not None:
            lsize = tuple(map(int, lsize))
            gsize = tuple(-(-g // l) * l for g, l in zip(gsize, lsize))
        try:
            ev = cl.enqueue_nd_range_kernel(self.queue, kernel, gsize, lsize)
        except cl.MemoryError as e:
            raise self._oom(e) from e
        if self._rec is not None:
            self._rec.on_launch(kernel, gsize, lsize, vals)
        return ev

    def _declare_args(self, kernel, vals):
        kernel.set_scalar_arg_dtypes([v.dtype if isinstance(v, np.generic) else None for v in vals])
        self._declared.add(id(kernel))

    def local_size(self, want, kernel=None):
        """Clamp a wanted 1-D work-group size to the device (and kernel) limits."""
        lim = self.max_work_group_size
        if kernel is not None:
            try:
                lim = min(lim, kernel.get_work_group_info(self.cl.kernel_work_group_info.WORK_GROUP_SIZE, self.device))
            except Exception:
                pass
        w = 1
        while w * 2 <= min(want, lim):
            w *= 2
        return w

    def finish(self):
        if self._rec is not None:
            self._rec.refuse("it waits for the queue")
        self.queue.finish()

    # -- memory --------------------------------------------------------------------------------------------------
    def _oom(self, e):
        return DeviceError(
            f"The OpenCL device {self.info.name} ran out of memory ({e}); tcl had {self.allocated_bytes / 2**20:.0f} "
            "MiB allocated.",
            "Lower train.batch_size (or --batch-size), freeze more layers, or use a device with more memory.",
        )

    def _alloc(self, nbytes):
        cl = self.cl
        try:
            buf = cl.Buffer(self.ctx, cl.mem_flags.READ_WRITE, size=max(int(nbytes), 4))
        except (cl.MemoryError, cl.Error) as e:
            raise self._oom(e) from e
        self.allocated_bytes += max(int(nbytes), 4)
        self.peak_bytes = max(self.peak_bytes, self.allocated_bytes)
        return buf

    def empty(self, shape, dtype=np.float32):
        """An uninitialised device array from the pool (`pool_fit`), else in a new buffer."""
        shape = tuple(int(s) for s in shape)
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        key = max(nbytes, 4)
        self._take_returned()
        with self._lock:
            # pool_fit's first choice, the exact size, without listing the pool (the common case, every step)
            fit = key if self._pool.get(key) else pool_fit([k for k, v in self._pool.items() if v], key)
            buf = self._pool[fit].pop() if fit is not None else None
        if buf is None:
            buf = self._alloc(key)
        else:
            key = fit
        if self._rec is not None:
            self._rec.on_take(buf, key)
        return DeviceArray(self, buf, shape, dtype, pooled=True, capacity=key)

    def pool_release(self, arr):
        self.pool_return(arr.buf, arr.capacity)

    def pool_return(self, buf, capacity):
        with self._lock:
            self._pool[capacity].append(buf)

    def _take_returned(self):
        while self.returned:
            self.pool_return(*self.returned.pop())

    def pool_ids(self):
        """id() of every buffer waiting in the pool."""
        self._take_returned()
        with self._lock:
            return {id(b) for bufs in self._pool.values() for b in bufs}

    def pool_take(self, buf, capacity):
        """Take one free buffer out of the pool for good (a replay's); (buf, capacity) for pool_return."""
        with self._lock:
            bufs = self._pool[capacity]
            bufs.pop(next(i for i, b in enumerate(bufs) if b is buf))
        return buf, capacity

    def zeros(self, shape, dtype=np.float32):
        a = self.empty(shape, dtype)
        self.fill(a, 0)
        return a

    def fill(self, arr, value):
        cl = self.cl
        if arr.nbytes:
            pattern = np.array([value], dtype=arr.dtype)
            cl.enqueue_fill_buffer(self.queue, arr.buf, pattern, 0, arr.nbytes)
            if self._rec is not None:
                self._rec.on_fill(arr.buf, pattern, arr.nbytes)
        return arr

    def to_device(self, array, out=None):
        if self._rec is not None:
            self._rec.refuse("it uploads host data")
        a = np.ascontiguousarray(array)
        if a.dtype not in (np.float32, np.int32):
            a = a.astype(np.int32 if np.issubdtype(a.dtype, np.integer) else np.float32)
        dst = out if out is not None else self.empty(a.shape, a.dtype)
        if a.nbytes:
            self.cl.enqueue_copy(self.queue, dst.buf, a, is_blocking=False)
            # The host array must stay alive until the copy is done; keep it simple and safe.
            self.queue.finish()
        return dst

    def to_host(self, arr):
        if self._rec is not None:
            self._rec.refuse("it reads device data back")
        out = np.empty(arr.shape, dtype=arr.dtype)
        if out.nbytes:
            self.cl.enqueue_copy(self.queue, out, arr.buf, is_blocking=True)
        return out

    def to_half(self, arr):
        """Store a pooled float32 array as IEEE half in place (the same object; its float buffer goes back to the
        pool): half the memory while it waits for the backward pass. `to_float` restores it."""
        if arr.half or not arr._pooled or arr.dtype != np.float32 or arr.size == 0:
            return False
        if self._rec is not None:
            self._rec.refuse("it stores a tensor as half precision")
        h = self.empty((arr.size,), np.float16)
        self._convert("f32_to_f16", arr, h)
        self.pool_release(arr)  # queued after the conversion on the in-order queue
        arr.buf, arr.capacity, arr.half = h.buf, h.capacity, True
        h._pooled = False
        return True

    def to_float(self, arr):
        if not arr.half:
            return
        f = self.empty(arr.shape)
        self._convert("f16_to_f32", arr, f)
        self.pool_release(arr)
        arr.buf, arr.capacity, arr.half = f.buf, f.capacity, False
        f._pooled = False

    def _convert(self, name, src, dst):
        k = self.kernel("elementwise", name)
        # A fixed work-group size: PoCL builds a kernel once per size.
        self.launch(k, (-(-src.size // 8),), (self.local_size(64, k),), src, dst, np.int32(src.size))

    def copy(self, src, dst=None):
        dst = dst if dst is not None else self.empty(src.shape, src.dtype)
        if src.nbytes:
            self.cl.enqueue_copy(self.queue, dst.buf, src.buf, byte_count=src.nbytes)
            if self._rec is not None:
                self._rec.on_copy(src.buf, dst.buf, src.nbytes)
        return dst


# The first run on a device compiles every kernel (tens of seconds on a phone, several on PoCL), after which the
# programs come from a cache: a build taking longer than this prints, once per process and only on a terminal, what
# is happening, so a first run does not look hung.
BUILD_HINT_SECONDS = 1.0
_BUILD_HINT = {"shown": False}


def _hint_cache_dir(rt):
    if rt.is_pocl:
        return os.environ.get("POCL_CACHE_DIR") or cache_dir("pocl")
    return cache_dir("programs")


@contextlib.contextmanager
def _build_hint(rt):
    """Around one program build: past BUILD_HINT_SECONDS, print 'building OpenCL kernels for DEVICE (once; cached
    in DIR)' on stderr (from a timer, so it appears while the build runs), once per process, on a terminal only."""
    import sys

    if _BUILD_HINT["shown"] or not getattr(sys.stderr, "isatty", lambda: False)():
        yield
        return

    def show():
        if _BUILD_HINT["shown"]:
            return
        _BUILD_HINT["shown"] = True
        msg = f"building OpenCL kernels for {rt.info.name} (once; cached in {_hint_cache_dir(rt)})"
        try:
            from tqdm import tqdm

            tqdm.write(msg, file=sys.stderr)  # above any progress bar on the screen
        except Exception:  # noqa: BLE001 - a hint must never break a build
            print(msg, file=sys.stderr, flush=True)

    timer = threading.Timer(BUILD_HINT_SECONDS, show)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


_RUNTIMES = {}


def get_runtime(spec=None):
    """The process-wide Runtime for a device selector (None for the numpy fallback)."""
    info = select_device(spec)
    if info is None:
        return None
    rt = _RUNTIMES.get(info.id)
    if rt is None:
        rt = Runtime(info)
        _RUNTIMES[info.id] = rt
    return rt
