"""Op registry: each graph op has a forward and a backward function per backend.

Backends are 'numpy' (float64 reference, the slow fallback device) and 'opencl' (the project's kernels).
Modules register their implementations at import time:

    @register("opencl", "relu")
    def relu_fwd(be, node, xs, training):      # -> (list of outputs, saved-for-backward)
        ...
    @register("opencl", "relu", "backward")
    def relu_bwd(be, node, saved, gys, need):  # -> (list of input grads (None where not needed), {param: grad})
        ...

`be` is the backend (see backends.py): `be.param(node, "weight")` gives a parameter as a backend tensor,
`be.empty(shape)`, `be.release(t)`. `need.inputs[i]` says whether input i needs a gradient; `need.params` whether
the node's parameters do. Functions that are not graph ops (loss, optimizer steps) register with kind "fn".

The saved-for-backward context may hold the op's input and output tensors themselves (not views of them) and its own
temporaries: the executor keeps exactly the tensors a context holds alive until that backward has run, frees the
rest as soon as the forward pass is done with them, and may store the held ones as half precision meanwhile
(precision: fp16). So a forward saves only what its backward reads (ReLU its output, not also its input).
"""
import importlib

_REGISTRY = {}
_LOADED = set()

# Modules holding implementations, per backend; imported on first use.
IMPLEMENTATIONS = {
    "numpy": ["ref_conv", "ref_elementwise", "ref_tensor", "optim"],
    "opencl": ["cl_gemm", "cl_conv", "cl_elementwise", "cl_tensor", "optim"],
}


class Need:
    __slots__ = ("inputs", "params")

    def __init__(self, inputs, params):
        self.inputs = list(inputs)
        self.params = bool(params)


def register(backend, op, kind="forward"):
    def deco(fn):
        _REGISTRY[(backend, op, kind)] = fn
        return fn

    return deco


def _load(backend):
    if backend in _LOADED:
        return
    _LOADED.add(backend)
    for mod in IMPLEMENTATIONS.get(backend, []):
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as e:
            # A module still being written must not break the others.
            if e.name != f"{__name__}.{mod}":
                raise


def lookup(backend, op, kind="forward"):
    _load(backend)
    return _REGISTRY.get((backend, op, kind))


def supported(backend, kind="forward"):
    _load(backend)
    return sorted(op for (b, op, k) in _REGISTRY if b == backend and k == kind)
