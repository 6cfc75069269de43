"""Backends: where tensors live and which op implementations run.

`NumpyBackend` runs the float64 numpy reference (tests, and `--device numpy` where no OpenCL exists);
`CLBackend` runs the OpenCL kernels on one device. Both give ops the same small interface.
"""
import numpy as np

from . import ops as _ops
from .errors import ModelError


class Backend:
    name = "?"

    def __init__(self):
        self._params = {}  # (node name, param name) -> backend tensor
        self._derived = {}  # (node name, param name) -> (its device tensor, {tag: tensor derived from it})
        self._trained = set()  # nodes some Executor on this backend trains (their parameters change in place)
        # Counts replaced device copies and dropped derived ones: a recorded pass (replay.py) that read the old
        # buffers must not run again.
        self.generation = 0

    # tensors ------------------------------------------------------------------------------------------------------
    def asarray(self, x):
        raise NotImplementedError

    def to_host(self, t):
        raise NotImplementedError

    def empty(self, shape, dtype=np.float32):
        raise NotImplementedError

    def zeros(self, shape, dtype=np.float32):
        raise NotImplementedError

    def release(self, t):
        pass

    def store_half(self, t):
        """Keep t as half precision until `load_full` (precision: fp16); False where the backend does not."""
        return False

    def load_full(self, t):
        pass

    def shape(self, t):
        return tuple(t.shape)

    # parameters ---------------------------------------------------------------------------------------------------
    def param(self, node, key):
        """The node's parameter as a backend tensor (uploaded once, then updated in place by optimizers).

        The cache remembers which host array it uploaded: a node whose array was replaced (another graph with the
        same layer names, weights loaded from a checkpoint) gets a fresh upload."""
        k = (node.name, key)
        host = node.params[key]
        hit = self._params.get(k)
        if hit is not None and hit[0] is host:
            return hit[1]
        if hit is not None:
            self.generation += 1
            self.release(hit[1])
        t = self.asarray(host)
        self._params[k] = (host, t)
        return t

    def has_param(self, node, key):
        return key in node.params

    CONST_CACHE_MAX_BYTES = 64 << 20  # a larger parameter gets no derived copies (VGG's 411 MB fc6 weight)

    def const_cache(self, node, key):
        """A dict for tensors an op derives from a parameter that cannot change (GEMM panels of a frozen weight,
        packed once), or None where it can: a node an Executor on this backend trains, a parameter above
        CONST_CACHE_MAX_BYTES. The dict lives as long as the parameter's device copy (a fresh upload, as after
        forget_params or a replaced host array, starts an empty one)."""
        if node.name in self._trained or node.params[key].nbytes > self.CONST_CACHE_MAX_BYTES:
            return None
        base = self.param(node, key)
        k = (node.name, key)
        hit = self._derived.get(k)
        if hit is None or hit[0] is not base:
            self._drop_derived(k)
            hit = self._derived[k] = (base, {})
        return hit[1]

    def declare_trained(self, names):
        """Nodes whose parameters an optimizer will update in place: no derived copies for them from now on."""
        self._trained.update(names)
        for k in [k for k in self._derived if k[0] in self._trained]:
            self._drop_derived(k)

    def _drop_derived(self, k):
        hit = self._derived.pop(k, None)
        if hit is not None:
            self.generation += 1
        for t in (hit[1].values() if hit else ()):
            self.release(t)

    def forget_params(self, node=None):
        """Drop device copies (all, or one node's) after host-side parameters changed."""
        for k in [k for k in self._params if node is None or k[0] == node.name]:
            self.generation += 1
            self.release(self._params.pop(k)[1])
            self._drop_derived(k)

    def sync_params_to_host(self, graph):
        """Copy device parameters back into graph.node.params (float32)."""
        for n in graph.param_nodes():
            for key in list(n.params):
                hit = self._params.get((n.name, key))
                if hit is not None and hit[0] is n.params[key]:
                    arr = np.asarray(self.to_host(hit[1]), dtype=np.float32).reshape(n.params[key].shape)
                    n.params[key] = arr
                    self._params[(n.name, key)] = (arr, hit[1])

    # ops ----------------------------------------------------------------------------------------------------------
    def forward_fn(self, op):
        fn = _ops.lookup(self.name, op, "forward")
        if fn is None:
            raise ModelError(f"The op '{op}' has no {self.name} implementation in this version of tcl.",
                             "Run `tcl inspect MODEL` to see which layers are unsupported.")
        return fn

    def backward_fn(self, op):
        fn = _ops.lookup(self.name, op, "backward")
        if fn is None:
            raise ModelError(f"The op '{op}' cannot be trained on the {self.name} backend (no backward pass).",
                             "Freeze that layer in the recipe (`freeze`), or cut the model before it.")
        return fn

    def fn(self, name):
        f = _ops.lookup(self.name, name, "fn")
        if f is None:
            raise NotImplementedError(f"{name} on {self.name}")
        return f

    def finish(self):
        pass


class NumpyBackend(Backend):
    """Reference backend: float64 numpy by default (float32 as a faster fallback device)."""

    name = "numpy"

    def __init__(self, dtype=np.float64):
        super().__init__()
        self.dtype = np.dtype(dtype)

    def asarray(self, x):
        x = np.asarray(x)
        if np.issubdtype(x.dtype, np.integer):
            return x.astype(np.int64)
        return x.astype(self.dtype, copy=True)

    def to_host(self, t):
        return np.asarray(t)

    def empty(self, shape, dtype=np.float32):
        return np.empty(shape, dtype=self.dtype if dtype == np.float32 else dtype)

    def zeros(self, shape, dtype=np.float32):
        return np.zeros(shape, dtype=self.dtype if dtype == np.float32 else dtype)


class CLBackend(Backend):
    """The project's OpenCL kernels on one device (`Runtime`)."""

    name = "opencl"

    def __init__(self, rt):
        super().__init__()
        self.rt = rt

    def asarray(self, x):
        from .runtime import DeviceArray

        if isinstance(x, DeviceArray):
            return x
        return self.rt.to_device(x)  # converts to float32 / int32 (a float32 batch is not copied on the host)

    def to_host(self, t):
        return self.rt.to_host(t)

    def empty(self, shape, dtype=np.float32):
        return self.rt.empty(shape, dtype)

    def zeros(self, shape, dtype=np.float32):
        return self.rt.zeros(shape, dtype)

    def release(self, t):
        if t is not None and hasattr(t, "release"):
            t.release()

    def store_half(self, t):
        return self.rt.to_half(t)

    def load_full(self, t):
        self.rt.to_float(t)

    def finish(self):
        self.rt.finish()


def make_backend(device=None):
    """Backend for a device selector: 'numpy' gives the reference backend (float32 for speed), else OpenCL."""
    from .runtime import get_runtime

    rt = get_runtime(device)
    if rt is None:
        import warnings

        warnings.warn("Using the numpy reference implementation (--device numpy): it needs no OpenCL but is many "
                      "times slower than an OpenCL device.", RuntimeWarning, stacklevel=2)
        return NumpyBackend(np.float32)
    return CLBackend(rt)
