"""The internal graph every importer produces and every backend executes.

Conventions (shared by importers, reference ops, OpenCL ops, planner and exporters):
- Activations are float32 with the batch first. 4-D image tensors are NHWC (channels last). Importers of NCHW
  formats (ONNX) convert: they transpose conv weights and insert explicit `transpose` nodes where a layout-sensitive
  op (Flatten/Reshape/Transpose of a 4-D tensor in the source's NCHW order) needs the source's order.
- Tensor names are strings; each node lists its input and output tensor names. `Graph.nodes` is topologically
  sorted. The graph input(s) are `Graph.inputs` (name -> shape without batch, NHWC).
- `Node.name` is the model's own layer name (Keras layer name; ONNX node name, else its output name): users freeze,
  cut and export by these names.
- Parameters are float32 numpy arrays in `Node.params`, with canonical names per op (see OPS below); the importer
  remembers the source layout in `Node.source` so exporters can write the original names back.

Canonical ops, their attributes and parameters (all shapes NHWC / channels-last):
  conv2d        attrs kernel=(kh,kw) strides=(sh,sw) dilations=(dh,dw) pads=(top,left,bottom,right) groups=int
                      act=None|'relu'|'relu6' (fused epilogue, inference only)
                params weight (kh, kw, cin//groups, cout) [HWIO], bias (cout,) optional
                (depthwise: groups == cin, cout == cin * multiplier; weight (kh, kw, 1, cout))
  dense         params weight (cin, cout), bias (cout,) optional; input (N, cin) -> (N, cout)
                attrs act=None|'relu'|'relu6'
  batchnorm     attrs eps, momentum (Keras convention: new = momentum*old + (1-momentum)*batch)
                params gamma, beta, mean, var (C,) over the last axis
  relu | relu6 | sigmoid | tanh | swish | hard_swish    (no attrs)
  clip          attrs min, max
  leaky_relu    attrs alpha
  hard_sigmoid  attrs alpha, beta  (y = clip(alpha*x + beta, 0, 1))
  softmax       attrs axis (default -1)
  add | mul     two or more inputs, numpy broadcasting (the sum of many inputs for ONNX Sum)
  scale         attrs scale, offset: y = x * scale + offset (Keras Rescaling; per-channel arrays allowed as params
                `scale`, `offset` of shape (C,))
  concat        attrs axis (physical axis, NHWC: channels = 3)
  pad           attrs pads=(top,left,bottom,right), value (constant mode only)
  maxpool       attrs kernel, strides, pads=(top,left,bottom,right), ceil_mode=False
  avgpool       attrs kernel, strides, pads, count_include_pad=bool, ceil_mode=False
  global_avgpool attrs keepdims=bool  ((N,H,W,C) -> (N,1,1,C) or (N,C))
  flatten       (N, ...) -> (N, prod) in physical (row-major) order
  reshape       attrs shape (without batch)
  transpose     attrs perm (with batch axis)
  lrn           attrs size, alpha, beta, bias (across channels, last axis)
  dropout       attrs rate, seed (identity at inference)
  identity
  (issue 14; axes count in the full rank with 0 = batch, which is never sliced, normalised or reduced; negative
  axes from the end; semantics in ops/ref_tensor.py)
  slice         attrs axes, starts, ends, steps (lists of equal length; Python/ONNX slicing: negative indices,
                clamping, negative steps)  (ONNX Slice / Split, Keras Cropping2D)
  layer_norm    attrs axis (normalise over axis..last), epsilon; params gamma, beta (the normalised dims' shape,
                beta optional)
  erf | sqrt | reciprocal | neg    (no attrs)
  gelu          attrs approximate='none'|'tanh'
  pow           attrs exponent (float constant)
  sub | div     two inputs, numpy broadcasting (a - b, a / b)
  reduce_mean | reduce_sum   attrs axes (list, default every axis but the batch), keepdims (default True)
  fake_quant    attrs scale, zero_point, dtype='uint8'|'int8' (issue 16; per tensor): ONNX QuantizeLinear then
                DequantizeLinear, y = (clamp(rint(x / scale) + zero_point, qmin, qmax) - zero_point) * scale; the
                gradient passes where x is inside the representable range (straight-through)
"""
import copy
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Node:
    name: str
    op: str
    inputs: list
    outputs: list
    attrs: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    source: str = ""  # original layer/op type ("Conv2D", "Conv", ...)

    @property
    def output(self):
        return self.outputs[0]

    def num_params(self):
        return int(sum(int(np.prod(p.shape)) for p in self.params.values()))


@dataclass
class Graph:
    nodes: list
    inputs: dict  # tensor name -> shape without batch
    outputs: list  # tensor names
    name: str = "model"
    meta: dict = field(default_factory=dict)  # format, preprocessing hints, source file, ...

    def copy(self):
        return copy.deepcopy(self)

    def node(self, name):
        """The node of that name; in a graph that plan.fold_frozen made, also a BatchNorm a convolution carries."""
        for n in self.nodes:
            if n.name == name:
                return n
        for n in self.param_nodes():
            if n.name == name:
                return n
        from .errors import ModelError, closest

        hint = closest(name, [n.name for n in self.nodes])
        raise ModelError(
            f"The model has no layer named '{name}'." + (f" Did you mean '{hint}'?" if hint else ""),
            "Run `tcl inspect MODEL` to list the layer names.",
        )

    def names(self):
        return [n.name for n in self.nodes]

    def producer(self):
        """tensor name -> node that writes it."""
        return {t: n for n in self.nodes for t in n.outputs}

    def consumers(self):
        out = {}
        for n in self.nodes:
            for t in n.inputs:
                out.setdefault(t, []).append(n)
        return out

    def param_nodes(self):
        """Every node with parameters, including a BatchNorm that a trainable convolution carries (attr 'bn',
        plan.fold_frozen): its parameter dict is the original node's, and its gradients come from the convolution."""
        return [m for n in self.nodes for m in ([n] + ([n.attrs["bn"]] if n.attrs.get("bn") else [])) if m.params]

    def params(self):
        """Flat {'layer/param': array} view of every parameter."""
        return {f"{n.name}/{k}": v for n in self.nodes for k, v in n.params.items()}

    def num_params(self):
        return sum(n.num_params() for n in self.nodes)

    def topo_check(self):
        seen = set(self.inputs)
        for n in self.nodes:
            for t in n.inputs:
                if t not in seen:
                    raise ValueError(f"node {n.name} reads {t} before it is written")
            seen.update(n.outputs)
        for t in self.outputs:
            if t not in seen:
                raise ValueError(f"graph output {t} is never written")

    def prune(self):
        """Drop nodes whose outputs nothing needs (after a cut)."""
        need = set(self.outputs)
        keep = []
        for n in reversed(self.nodes):
            if any(t in need for t in n.outputs):
                keep.append(n)
                need.update(n.inputs)
        self.nodes = list(reversed(keep))
        return self
