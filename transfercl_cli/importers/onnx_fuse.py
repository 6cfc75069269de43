"""Pattern fusions of the ONNX importer: ops that exporters write out element by element, recognised and run as one.

- LayerNorm decomposed (torch.onnx below opset 17, the original ConvNeXt's channels-first LayerNorm, Keras2ONNX):
      m = ReduceMean(x, A); d = Sub(x, m); v = ReduceMean(Pow(d, 2) | Mul(d, d), A)
      n = Div(d, Sqrt(Add(v, eps)))  |  Mul(d, Reciprocal(Sqrt(Add(v, eps))))
      [y = Mul(n, gamma)] [y = Add(y, beta)]                       -> one `layer_norm` node
- GELU, exact: x * 0.5 * (1 + Erf(x / 1.4142...)) in any order and grouping of the products (torch.onnx's
  Div, Erf, Add 1, Mul x, Mul 0.5; onnxscript's Mul(0.5, .) then Mul(x, .); Mul by 1/sqrt(2) instead of the Div);
  tanh form: x * 0.5 * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3))) with x^3 = Pow(x, 3) or x * x * x
                                                                    -> one `gelu` node
- A contiguous view written as Reshape(x, [-1]) + Gather(arange(n).reshape(S)) (torch.onnx dynamo's as_strided,
  e.g. ConvNeXt's classifier)                                      -> a reshape of x to S (no node when free)

Two stages. `find_fusions` matches the structure only (op types, wiring, which operands are constants, every
intermediate read by the pattern alone and not a graph output) before conversion; the importer then skips the
members and, at the pattern's last node, calls `Fusion.emit`, which checks every value (both reductions over the
same axes with keepdims, exponent exactly 2, eps a single number, gamma/beta varying along the normalised axes only,
0.5 / 1 / sqrt(2) / sqrt(2/pi) / 0.044715 / 3 within float tolerance, no attribute the fusion does not read). When
anything does not match it returns None and the members are converted one by one, all of them supported on their
own: a fusion never changes what the graph computes.
"""
import math

import numpy as np

from .onnx_common import T, Unsupported, attrs as _attrs, norm_axis
from .onnx_ops import emit_layer_norm
from .registry import Tracked

REL_TOL = 1e-6  # constants are float32 (or float64) spellings of the exact value: ~1e-7 relative at worst


def close(v, target):
    return abs(float(v) - target) <= REL_TOL * abs(target)


def single(v, rank):
    """A constant that is one number and does not raise the rank of a rank-`rank` tensor it multiplies/adds."""
    v = None if v is None else np.asarray(v)
    return v is not None and v.size == 1 and v.ndim <= rank


class _Graph:
    """Producer / consumer indices over the ONNX node list."""

    def __init__(self, cx, nodes):
        self.nodes = nodes
        self.const = cx.static_const
        self.outputs = cx.graph_outputs
        self.prod = {o: i for i, n in enumerate(nodes) for o in n.output if o}
        self.cons = {}
        for i, n in enumerate(nodes):
            for t in n.input:
                if t:
                    self.cons.setdefault(t, set()).add(i)

    def op(self, t, *types):
        """Index of the node producing t when it is one of `types`, else None."""
        i = self.prod.get(t)
        return i if i is not None and self.nodes[i].op_type in types else None

    def only(self, t, reader):
        """t is read by node `reader` alone and is not a graph output."""
        return self.cons.get(t) == {reader} and t not in self.outputs

    def is_c(self, t):
        return t in self.const

    def split_const(self, i):
        """(computed input, constant input) of a two-input node with exactly one constant, else None."""
        ins = [t for t in self.nodes[i].input if t]
        if len(ins) != 2:
            return None
        a, b = ins
        if self.is_c(b) and not self.is_c(a):
            return a, b
        if self.is_c(a) and not self.is_c(b):
            return b, a
        return None

    def product(self, i, taken):
        """Leaves of the product tree rooted at Mul node i (expanding Mul producers read by the tree alone):
        (leaves as tensor names, Mul node indices)."""
        leaves, members = [], [i]
        for t in self.nodes[i].input:
            j = self.op(t, "Mul")
            if (j is not None and j not in taken and not self.is_c(t) and self.only(t, i)
                    and len([v for v in self.nodes[j].input if v]) == 2):
                lv, mj = self.product(j, taken)
                leaves += lv
                members += mj
            else:
                leaves.append(t)
        return leaves, members


class Fusion:
    kind = ""

    def __init__(self, g, members, **fields):
        self.g = g
        self.members = sorted(set(members))
        self.end = self.members[-1]
        self.f = fields

    def inputs(self):
        own = {o for i in self.members for o in self.g.nodes[i].output}
        return [t for i in self.members for t in self.g.nodes[i].input if t and t not in own]

    def name(self, cx):
        """The members' common name prefix (the source module), else the last member's name."""
        names = [cx.node_name(self.g.nodes[i]) for i in self.members]
        parts = [n.split("/") for n in names]
        common = []
        for seg in zip(*parts):
            if any(s != seg[0] for s in seg):
                break
            common.append(seg[0])
        prefix = "/".join(common)
        taken = {cx.node_name(n) for n in self.g.nodes}
        if len(common) < min(len(p) for p in parts) and prefix.strip("/") and prefix not in taken:
            return prefix
        return names[-1]

    def attrs_ok(self, cx, reads):
        """Every member's attributes are ones this fusion reads: {member index: fn(Tracked) -> bool}. False when
        a member has any other attribute or `fn` rejects its values."""
        for i in self.members:
            cfg = Tracked(_attrs(self.g.nodes[i]))
            fn = reads.get(i)
            if fn is not None and not fn(cfg):
                return False
            if cfg.unread():
                return False
        return True

    def const(self, cx, key):
        return cx.const(self.f[key])

    def emit(self, cx):  # -> {onnx output name: T} or None
        raise NotImplementedError


# --- LayerNorm --------------------------------------------------------------------------------------------------------
class LayerNormFusion(Fusion):
    kind = "layer_norm"

    def _axes(self, cx, i, rank):
        """The logical axes of ReduceMean node i (keepdims must be 1), or None."""
        n = self.g.nodes[i]
        out = {}

        def read(cfg):
            if int(cfg.get("keepdims", 1)) != 1:
                return False
            if cx.opset >= 18:
                cfg.get("noop_with_empty_axes")
                axes = cx.const(n.input[1]) if len(n.input) > 1 and n.input[1] else None
            else:
                axes = cfg.get("axes")
            if axes is None or np.asarray(axes).size == 0:
                return False  # every axis (the batch too), or none: not a layer norm tcl can run
            out["axes"] = sorted({norm_axis(a, rank) for a in np.asarray(axes).reshape(-1)})
            return True

        return read, out

    def emit(self, cx):
        f = self.f
        t = cx.get(f["x"])
        r1, a1 = self._axes(cx, f["mean"], t.rank)
        r2, a2 = self._axes(cx, f["var"], t.rank)
        if not self.attrs_ok(cx, {f["mean"]: r1, f["var"]: r2}):
            return None
        if a1["axes"] != a2["axes"] or 0 in a1["axes"]:
            return None
        if f["two"] is not None:
            two = cx.const(f["two"])
            if not single(two, t.rank) or float(np.asarray(two).reshape(-1)[0]) != 2.0:
                return None
        eps = cx.const(f["eps"])
        if not single(eps, t.rank) or not float(np.asarray(eps).reshape(-1)[0]) >= 0:
            return None
        eps = float(np.asarray(eps).reshape(-1)[0])
        gamma = cx.const(f["gamma"]) if f["gamma"] else None
        beta = cx.const(f["beta"]) if f["beta"] else None
        end = self.g.nodes[self.end]
        try:
            y = emit_layer_norm(cx, t, a1["axes"], eps, gamma, beta, self.name(cx), "LayerNormalization (decomposed)",
                                end.output[0])
        except Unsupported:
            return None
        return {end.output[0]: y}


def _match_layer_norm(g, i, taken):
    n = g.nodes[i]
    recip = None
    if n.op_type == "Div" and len(n.input) == 2:
        d, s = n.input
    elif n.op_type == "Mul" and len(n.input) == 2:
        for d, r in (tuple(n.input), tuple(reversed(n.input))):
            recip = g.op(r, "Reciprocal")
            if recip is not None and g.only(r, i):
                s = g.nodes[recip].input[0]
                break
        else:
            return None
    else:
        return None
    sq = g.op(s, "Sqrt")
    if sq is None or not g.only(s, recip if recip is not None else i):
        return None
    ve = g.nodes[sq].input[0]
    add = g.op(ve, "Add", "Sum")
    if add is None or not g.only(ve, sq):
        return None
    vc = g.split_const(add)
    if vc is None:
        return None
    v, eps = vc
    var = g.op(v, "ReduceMean")
    if var is None or not g.only(v, add):
        return None
    p = g.nodes[var].input[0]
    pw = g.op(p, "Pow", "Mul")
    if pw is None or not g.only(p, var):
        return None
    pin = list(g.nodes[pw].input)
    if g.nodes[pw].op_type == "Pow":
        if len(pin) != 2 or pin[0] != d or not g.is_c(pin[1]):
            return None
        two = pin[1]
    else:
        if pin != [d, d]:
            return None
        two = None
    sub = g.op(d, "Sub")
    if sub is None or g.cons.get(d) != {pw, i} or d in g.outputs:
        return None
    x, m = g.nodes[sub].input
    mean = g.op(m, "ReduceMean")
    if mean is None or not g.only(m, sub) or g.nodes[mean].input[0] != x or g.is_c(x):
        return None
    for k in (mean, var):  # opset 18: the axes input must be a constant
        ins = g.nodes[k].input
        if len(ins) > 1 and ins[1] and not g.is_c(ins[1]):
            return None
    members = [mean, sub, pw, var, add, sq, i] + ([recip] if recip is not None else [])
    gamma = beta = None
    out = n.output[0]
    nxt = g.cons.get(out, set())
    if len(nxt) == 1 and out not in g.outputs:
        j = next(iter(nxt))
        if g.nodes[j].op_type == "Mul" and g.split_const(j) and g.split_const(j)[0] == out:
            gamma = g.split_const(j)[1]
            members.append(j)
            out = g.nodes[j].output[0]
            nxt = g.cons.get(out, set())
    if len(nxt) == 1 and out not in g.outputs:
        j = next(iter(nxt))
        if g.nodes[j].op_type in ("Add", "Sum") and g.split_const(j) and g.split_const(j)[0] == out:
            beta = g.split_const(j)[1]
            members.append(j)
    if taken & set(members):
        return None
    return LayerNormFusion(g, members, x=x, mean=mean, var=var, two=two, eps=eps, gamma=gamma, beta=beta)


# --- GELU -------------------------------------------------------------------------------------------------------------
class GeluFusion(Fusion):
    kind = "gelu"

    def emit(self, cx):
        f = self.f
        if not self.attrs_ok(cx, {}):
            return None
        checks = [("half", 0.5), ("one", 1.0)]
        if f["form"] == "none":
            checks.append(("c", math.sqrt(2.0) if f["div"] else 1.0 / math.sqrt(2.0)))
        else:
            checks += [("k", math.sqrt(2.0 / math.pi)), ("c", 0.044715)]
            if f.get("three"):
                checks.append(("three", 3.0))
        t = cx.get(f["x"])
        for key, want in checks:
            v = cx.const(f[key])
            if not single(v, t.rank) or not close(np.asarray(v).reshape(-1)[0], want):
                return None
        end = self.g.nodes[self.end]
        y = cx.emit("gelu", self.name(cx), [t.name], {"approximate": f["form"]},
                    source=f"Gelu ({'Erf' if f['form'] == 'none' else 'Tanh'} form)", out=end.output[0])
        return {end.output[0]: T(y, t.shape, t.perm)}


def _one_plus(g, phi, reader, ops):
    """phi = Add/Sum(1, u) read by `reader` alone with u produced by one of `ops` (read by the Add alone):
    (add index, one, u's producer index) or None."""
    add = g.op(phi, "Add", "Sum")
    if add is None or not g.only(phi, reader):
        return None
    sc = g.split_const(add)
    if sc is None:
        return None
    u, one = sc
    k = g.op(u, *ops)
    if k is None or not g.only(u, add):
        return None
    return add, one, k


def _match_gelu(g, i, taken):
    if g.nodes[i].op_type != "Mul" or i in taken:
        return None
    leaves, muls = g.product(i, taken)
    if len(leaves) != 3:
        return None
    consts = [t for t in leaves if g.is_c(t)]
    comp = [t for t in leaves if not g.is_c(t)]
    if len(consts) != 1 or len(comp) != 2:
        return None
    half = consts[0]
    for x, phi in ((comp[0], comp[1]), (comp[1], comp[0])):
        readers = g.cons.get(phi, set())
        if len(readers) != 1 or next(iter(readers)) not in muls:
            continue
        hit = _one_plus(g, phi, next(iter(readers)), ("Erf", "Tanh"))
        if hit is None:
            continue
        add, one, k = hit
        q = g.nodes[k].input[0]
        if g.nodes[k].op_type == "Erf":
            m = _erf_arg(g, q, k, x)
            if m is None:
                continue
            j, c, div = m
            members = muls + [add, k, j]
            fields = dict(form="none", x=x, half=half, one=one, c=c, div=div)
        else:
            m = _tanh_arg(g, q, k, x, taken)
            if m is None:
                continue
            inner, fields = m
            members = muls + [add, k] + inner
            fields.update(form="tanh", x=x, half=half, one=one)
        if taken & set(members) or len(set(members)) != len(members):
            continue
        return GeluFusion(g, members, **fields)
    return None


def _erf_arg(g, q, erf, x):
    """q = Div(x, c) or Mul(x, c) read by the Erf alone: (index, c, is_div)."""
    j = g.op(q, "Div", "Mul")
    if j is None or not g.only(q, erf):
        return None
    n = g.nodes[j]
    if n.op_type == "Div":
        if len(n.input) == 2 and n.input[0] == x and g.is_c(n.input[1]):
            return j, n.input[1], True
        return None
    sc = g.split_const(j)
    if sc is None or sc[0] != x:
        return None
    return j, sc[1], False


def _tanh_arg(g, u, th, x, taken):
    """u = k * (x + c * x^3) read by the Tanh alone: (member indices, fields)."""
    j = g.op(u, "Mul")
    if j is None or not g.only(u, th):
        return None
    leaves, muls = g.product(j, taken)
    cs = [t for t in leaves if g.is_c(t)]
    rest = [t for t in leaves if not g.is_c(t)]
    if len(cs) != 1 or len(rest) != 1:
        return None
    s = rest[0]
    a = g.op(s, "Add", "Sum")
    if a is None or not g.only(s, next(iter(g.cons[s]))) or next(iter(g.cons[s])) not in muls:
        return None
    ins = [t for t in g.nodes[a].input if t]
    if len(ins) != 2 or x not in ins:
        return None
    w = ins[1] if ins[0] == x else ins[0]
    wm = g.op(w, "Mul")
    if wm is None or not g.only(w, a):
        return None
    wl, wmuls = g.product(wm, taken)
    wc = [t for t in wl if g.is_c(t)]
    wr = [t for t in wl if not g.is_c(t)]
    if len(wc) != 1:
        return None
    fields = dict(k=cs[0], c=wc[0])
    members = muls + [a] + wmuls
    if wr == [x, x, x]:
        return members, fields
    if len(wr) == 1:
        p = g.op(wr[0], "Pow")
        if p is None or not g.only(wr[0], next(iter(g.cons[wr[0]]))) or next(iter(g.cons[wr[0]])) not in wmuls:
            return None
        pin = g.nodes[p].input
        if len(pin) != 2 or pin[0] != x or not g.is_c(pin[1]):
            return None
        fields["three"] = pin[1]
        return members + [p], fields
    return None


# --- a contiguous view written as flatten + gather --------------------------------------------------------------------
class ViewFusion(Fusion):
    """torch.onnx (dynamo) writes some `as_strided` views (ConvNeXt's classifier after the average pool) as
    Reshape(x, [-1]) then Gather(axis 0) of the constant indices arange(n).reshape(S): x reshaped to S. The flat
    Reshape merges the batch axis, which tcl never does, so the pair is only run as the reshape it is."""

    kind = "view"

    def emit(self, cx):
        f = self.f
        reads = {}

        def gather(cfg):
            return int(cfg.get("axis", 0)) == 0

        def reshape(cfg):
            cfg.get("allowzero")  # the target is [-1] or [n]: no zeros, so allowzero changes nothing
            return True

        reads[self.f["gather"]], reads[self.f["reshape"]] = gather, reshape
        if not self.attrs_ok(cx, reads):
            return None
        t = cx.get(f["x"])
        n = int(np.prod(t.shape))
        target = cx.const(f["shape"])
        idx = cx.const(f["idx"])
        if target is None or idx is None or np.asarray(target).reshape(-1).tolist() not in ([-1], [n]):
            return None
        idx = np.asarray(idx)
        if (not np.issubdtype(idx.dtype, np.integer) or idx.ndim < 1 or idx.size != n or idx.shape[0] != t.shape[0]
                or not np.array_equal(idx.reshape(-1), np.arange(n))):
            return None
        end = self.g.nodes[self.end]
        y = cx.reshape_to(t, idx.shape, self.name(cx), "Reshape+Gather (view)")
        return {end.output[0]: y}


def _match_view(g, i, taken):
    n = g.nodes[i]
    if len(n.input) != 2 or not g.is_c(n.input[1]):
        return None
    r = g.op(n.input[0], "Reshape")
    if r is None or r in taken or not g.only(n.input[0], i):
        return None
    x, shape = (list(g.nodes[r].input) + [""])[:2]
    if not shape or not g.is_c(shape) or g.is_c(x):
        return None
    return ViewFusion(g, [r, i], x=x, shape=shape, idx=n.input[1], gather=i, reshape=r)


def find_fusions(cx, nodes):
    """{index of the last member: Fusion} for every structural match (members disjoint)."""
    g = _Graph(cx, nodes)
    taken, found = set(), {}
    for matcher, ops in ((_match_layer_norm, ("Div", "Mul")), (_match_gelu, ("Mul",)), (_match_view, ("Gather",))):
        for i, n in enumerate(nodes):
            if n.op_type not in ops or i in taken:
                continue
            f = matcher(g, i, taken)
            if f is None:
                continue
            taken.update(f.members)
            found[f.end] = f
    return found
