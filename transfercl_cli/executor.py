"""Runs a Graph on a backend: forward (inference or training) and backward to parameter gradients.

Only what a backward function will read stays alive for the backward pass. Each training forward returns a
saved-for-backward context; the tensors it references are *pinned* until that node's backward has run, and every
other intermediate goes back to the buffer pool as soon as its last forward reader has run (a BatchNorm output
read only by a ReLU6 that keeps its own output is freed in the forward pass). A frozen prefix runs in inference mode
(BatchNorm with moving statistics) and keeps nothing.
"""
import contextlib
import numpy as np

from .ops import Need
from .runtime import DeviceArray


def tensors_in(ctx):
    """The backend tensors a saved-for-backward context references (walks tuples, lists and dicts)."""
    found = []
    stack = [ctx]
    while stack:
        v = stack.pop()
        if isinstance(v, (DeviceArray, np.ndarray)):
            found.append(v)
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
    return found


def grad_region(graph, trainable):
    """(nodes, tensors) that gradients flow through: a trainable node with parameters and everything downstream."""
    tensors, nodes = set(), []
    for n in graph.nodes:
        if n.name in trainable and n.params or any(t in tensors for t in n.inputs):
            tensors.update(n.outputs)
            nodes.append(n)
    return nodes, tensors


class Executor:
    def __init__(self, graph, backend, trainable=(), half_saved=False):
        """half_saved (precision: fp16): tensors waiting for the backward pass are stored as half precision."""
        self.graph = graph
        self.be = backend
        self.trainable = set(trainable)
        self.half_saved = bool(half_saved)
        if self.trainable and hasattr(backend, "declare_trained"):
            backend.declare_trained(self.trainable)  # ops may not keep copies derived from weights that will change
        self._fwd = {}
        self._bwd = {}
        for n in graph.nodes:
            self._fwd[n.op] = self._fwd.get(n.op) or backend.forward_fn(n.op)
        self.grad_nodes, self.grad_tensors = grad_region(graph, self.trainable)
        self._grad_names = {n.name for n in self.grad_nodes}
        for n in self.grad_nodes:
            self._bwd[n.op] = self._bwd.get(n.op) or backend.backward_fn(n.op)
        # Last reader of each tensor, for freeing in the forward pass.
        self._last_use = {}
        for i, n in enumerate(graph.nodes):
            for t in n.inputs:
                self._last_use[t] = i
        self._saved = None
        self._live = None  # id(tensor) -> tensor: owned tensors past their last forward use, pinned by a context
        self._pins = None  # id(tensor) -> number of saved contexts that still reference it
        self._ctx_pins = None  # node name -> ids its context pinned
        from .replay import make_replayer

        self._replayer = make_replayer(self)  # inference passes recorded and replayed (replay.py); None: off

    @contextlib.contextmanager
    def per_node_times(self, times):
        """While active, every op's forward and backward is timed on its own (the queue drained before and after,
        so the figures are per kernel launch sequence, not overlapped): times[(node name, "fwd"|"bwd")] += seconds.
        For benchmarks (`bench/bench_mobilenet.py --layers`); it slows the run by the synchronisation."""
        import time

        def timed(fn, kind):
            def run(be, node, *args):
                be.finish()
                t0 = time.perf_counter()
                res = fn(be, node, *args)
                be.finish()
                times[(node.name, kind)] = times.get((node.name, kind), 0.0) + time.perf_counter() - t0
                return res
            return run

        saved = self._fwd, self._bwd
        self._fwd = {k: timed(v, "fwd") for k, v in saved[0].items()}
        self._bwd = {k: timed(v, "bwd") for k, v in saved[1].items()}
        if self._replayer is not None:
            self._replayer.paused = True  # a replay would skip the timed functions
        try:
            yield times
        finally:
            self._fwd, self._bwd = saved
            if self._replayer is not None:
                self._replayer.paused = False

    def node_training(self, n, training):
        if not training or n.name not in self._grad_names:
            return False
        if n.op == "batchnorm":
            # A trainable BatchNorm normalises with the batch's statistics (and updates its moving ones) unless the
            # plan keeps it in inference mode (train.batchnorm: the pretrained statistics, gamma/beta still train).
            return n.name in self.trainable and n.attrs.get("bn_mode", "batch") == "batch"
        return True

    def forward(self, feeds, training=False, outputs=None):
        """Run the graph. `feeds`: {input tensor name: array or backend tensor}. Returns {output name: tensor}.

        With training=True the state for `backward` is kept; otherwise intermediates are freed on the way, and once
        a set of input shapes has run the pass is recorded and later calls replay its kernel launches (replay.py).
        """
        want = list(outputs or self.graph.outputs)
        if not training and self._replayer is not None:
            return self._replayer.forward(feeds, want)
        return self._run(feeds, training, want)

    def close(self):
        """Give the buffers of recorded passes back to the backend's pool (also when the executor is collected)."""
        if self._replayer is not None:
            self._replayer.close()

    def _run(self, feeds, training, want):
        be = self.be
        env = {}
        owned = set()
        for k, v in feeds.items():
            env[k] = be.asarray(v)
            if env[k] is not v:
                owned.add(k)
        saved = {}
        keep = set(want)
        pins, ctx_pins, live = {}, {}, {}

        def drop(t):
            v = env.pop(t)
            owned.discard(t)
            if id(v) in pins:
                live[id(v)] = v  # a backward still reads it
                if self.half_saved:
                    be.store_half(v)
            else:
                be.release(v)

        for i, n in enumerate(self.graph.nodes):
            xs = [env[t] for t in n.inputs]
            ys, ctx = self._fwd[n.op](be, n, xs, self.node_training(n, training))
            for t, y in zip(n.outputs, ys):
                env[t] = y
                owned.add(t)
            if training and n.name in self._grad_names:
                saved[n.name] = ctx
                held = tensors_in(ctx)
                for v in held:
                    if isinstance(v, DeviceArray) and not v._pooled:
                        # Pins follow tensor objects: a view would leave its base free to be reused.
                        raise RuntimeError(f"{n.op} {n.name}: its saved-for-backward context holds a view; save "
                                           "the tensor itself")
                ids = {id(v) for v in held}
                ctx_pins[n.name] = ids
                for k in ids:
                    pins[k] = pins.get(k, 0) + 1
            elif ctx is not None and hasattr(ctx, "release"):
                ctx.release()
            # Free inputs whose last reader this was, and outputs nothing reads.
            for t in set(n.inputs):
                if self._last_use.get(t) == i and t not in keep and t in owned:
                    drop(t)
            for t in n.outputs:
                if t not in self._last_use and t not in keep and t in owned:
                    drop(t)
        out = {t: env[t] for t in want}
        for t in [t for t in env if t in owned and t not in want]:
            drop(t)
        if training:
            self._saved, self._pins, self._ctx_pins, self._live = saved, pins, ctx_pins, live
        return out

    def _unpin(self, name):
        for k in self._ctx_pins.pop(name, ()):
            self._pins[k] -= 1
            if self._pins[k] == 0:
                del self._pins[k]
                v = self._live.pop(k, None)
                if v is not None:
                    self.be.release(v)

    def backward(self, grad_outputs):
        """Backpropagate {output tensor: gradient}. Returns {(node name, param): gradient} for trainable nodes."""
        if self._saved is None:
            raise RuntimeError("backward() needs a forward(training=True) first")
        be = self.be
        grads = dict(grad_outputs)
        pgrads = {}
        for n in reversed(self.grad_nodes):
            gys = [grads.pop(t, None) for t in n.outputs]
            if all(g is None for g in gys):
                continue
            need = Need([t in self.grad_tensors for t in n.inputs], n.name in self.trainable and bool(n.params))
            for k in self._ctx_pins.get(n.name, ()):
                if k in self._live:
                    be.load_full(self._live[k])
            gxs, gps = self._bwd[n.op](be, n, self._saved.pop(n.name), gys, need)
            self._unpin(n.name)
            for g in gys:
                if g is not None and all(g is not v for v in grad_outputs.values()):
                    be.release(g)
            for t, g, nd in zip(n.inputs, gxs, need.inputs):
                if g is None or not nd:
                    if g is not None:
                        be.release(g)
                    continue
                if t in grads:
                    # A tensor read by several layers (residuals) sums their gradients.
                    be.fn("add_inplace")(be, grads[t], g)
                    be.release(g)
                else:
                    grads[t] = g
            if need.params:
                for k, g in gps.items():  # (layer, param) keys: a BatchNorm that a convolution carries (attr bn)
                    pgrads[k if isinstance(k, tuple) else (n.name, k)] = g
            elif gps:
                for g in gps.values():
                    be.release(g)
        for g in grads.values():
            if all(g is not v for v in grad_outputs.values()):
                be.release(g)
        self.end_step()
        return pgrads

    def end_step(self):
        """Release what the last training forward kept (also after a forward without backward)."""
        if self._live:
            for v in self._live.values():
                self.be.release(v)
        self._live = self._pins = self._ctx_pins = None
        if self._saved:
            for ctx in self._saved.values():
                if ctx is not None and hasattr(ctx, "release"):
                    ctx.release()
        self._saved = None


def run_forward(graph, backend, feeds, outputs=None):
    """One inference pass; returns host numpy arrays."""
    ex = Executor(graph, backend)
    out = ex.forward(feeds, training=False, outputs=outputs)
    res = {k: backend.to_host(v) for k, v in out.items()}
    for v in out.values():
        backend.release(v)
    return res
