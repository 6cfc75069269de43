"""Pieces shared by the ONNX importer (onnx_import.py), its per-op converters (onnx_ops.py) and its pattern fusions
(onnx_fuse.py): the tensor record `T` (logical ONNX shape + physical permutation), permutation helpers, the
"this node cannot be converted" exception, and attribute / constant readers."""
import numpy as np

P4 = (0, 2, 3, 1)  # perm of an NHWC-physical tensor with NCHW logical shape
FLOAT_TYPES = (1, 10, 11, 16)  # ONNX float, float16, double, bfloat16


class Unsupported(Exception):
    """A node tcl cannot convert, with the reason (collected and reported with every other one at the end)."""

    def __init__(self, why):
        super().__init__(why)
        self.why = why


class Const:
    """A converter's result that is a constant (folded at import), not a computed tensor."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = np.asarray(value)


def attrs(node):
    """{name: python value} of an ONNX node's attributes (strings stay bytes, as onnx gives them)."""
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def text(v):
    return v.decode() if isinstance(v, bytes) else str(v)


def inv(p):
    out = [0] * len(p)
    for i, v in enumerate(p):
        out[v] = i
    return tuple(out)


def ident(r):
    return tuple(range(r))


def norm_axis(ax, rank, what="axis"):
    a = int(ax)
    a = a + rank if a < 0 else a
    if not 0 <= a < rank:
        raise Unsupported(f"{what} {ax} is out of range for a rank-{rank} tensor")
    return a


def scalar(c, what):
    """A size-1 constant as a float."""
    c = np.asarray(c)
    if c.size != 1:
        raise Unsupported(f"{what} must be a single number, got a constant of shape {c.shape}")
    return float(c.reshape(-1)[0])


class T:
    """An ONNX tensor as we hold it: our tensor name, logical (ONNX) shape with batch, physical perm.

    The physical array we compute is logical.transpose(perm); perm[0] is always 0 (the batch stays first)."""

    __slots__ = ("name", "shape", "perm")

    def __init__(self, name, shape, perm=None):
        self.name = name
        self.shape = tuple(int(v) for v in shape)
        self.perm = tuple(perm) if perm is not None else ident(len(self.shape))

    @property
    def rank(self):
        return len(self.shape)

    @property
    def phys(self):
        return tuple(self.shape[i] for i in self.perm)

    def phys_axis(self, logical):
        """The physical (full-rank) axis holding a logical axis."""
        return inv(self.perm)[logical]

    def __repr__(self):
        return f"T({self.name!r}, {self.shape}, perm={self.perm})"


def perm_moving_last(perm, axes):
    """A perm that keeps the current physical order but moves the logical `axes` to the end (in their current
    physical order): what a layer norm / reduction over `axes` wants as the trailing physical axes."""
    axes = set(axes)
    return tuple([p for p in perm if p not in axes] + [p for p in perm if p in axes])


def drop_axes(perm, axes):
    """The perm of a tensor after its logical `axes` are removed (keepdims=False reductions)."""
    keep = [a for a in range(len(perm)) if a not in set(axes)]
    return tuple(keep.index(p) for p in perm if p in keep)


def const_on_axes(c, t, axes, what):
    """A constant broadcast against tensor `t` that may vary along the logical `axes` only, as the physical array
    over those axes (in t's physical order, after `perm_moving_last`), or raise Unsupported."""
    c = np.asarray(c, np.float64)
    r = t.rank
    if c.ndim > r:
        raise Unsupported(f"{what} of shape {c.shape} has more axes than the tensor {t.shape}")
    full = c.reshape((1,) * (r - c.ndim) + c.shape)
    for a in range(r):
        if a not in axes and full.shape[a] != 1:
            raise Unsupported(f"{what} of shape {c.shape} varies along axis {a}, outside the normalised axes")
    target = tuple(t.shape[a] if a in axes else 1 for a in range(r))
    try:
        full = np.broadcast_to(full, target)
    except ValueError:
        raise Unsupported(f"{what} of shape {c.shape} does not broadcast to the tensor {t.shape}") from None
    want = perm_moving_last(t.perm, axes)
    phys = np.transpose(full, want)
    return phys.reshape(tuple(t.shape[p] for p in want[r - len(axes):]))
