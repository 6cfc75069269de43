"""Recorded inference passes: the kernel launches of one forward, replayed without the Python that chose them.

At batch 1 a depthwise or squeeze-excite network spends more time in Python than in its kernels: MobileNetV3-Small
queues 82 kernels per image, and choosing each one (geometry, routes, tile plans, buffer pool, argument packing)
costs ~27 us of Python against ~14 us for the enqueue itself. Nothing in those choices depends on the values in the
tensors, only on their shapes, so after a pass has run once for a set of input shapes the same commands can be sent
again: each launch gets its own kernel object with its arguments set once, and a replay is one enqueue per command.

A pass is recorded only when nothing in it could make a replay wrong; otherwise it runs as before and recording is
tried again on a later call (a shape still being tuned syncs the queue) or given up:
- every command it queued went through the Runtime (launch, fill, copy) from this thread, and nothing read or wrote
  host memory or waited on the queue (to_host, to_device, finish): that would be work a replay skips;
- every buffer it took from the pool is back there at the end, or is one of the outputs: those buffers are then
  taken out of the pool for good (the replay writes them again), so no other tensor can be handed one of them;
- a replay runs only while the parameters are the ones recorded: the same host arrays in the graph and no device copy
  replaced or derived copy dropped since (Backend.generation). Otherwise the recording is dropped, its buffers go back
  to the pool, and the pass is recorded again.
The inputs are not part of a recording: the arguments that were the input buffers are set to this call's inputs. The
outputs are copied into fresh buffers (the caller owns them, and they survive the next call).

TCL_REPLAY=0 turns replays off (every pass then runs op by op, as during training).
"""
import os
import threading
import weakref

import numpy as np

from .runtime import DeviceArray

RECORD_AFTER = 1  # calls with a set of shapes before one is recorded (the first compiles and starts tuning)
RECORD_ATTEMPTS = 32  # recordings tried per set of shapes before giving up (a shape tuner syncs for ~a dozen calls)
MAX_RECORDINGS = 2  # per executor: a full batch and the last, smaller one (each holds its own buffers)


def enabled():
    return os.environ.get("TCL_REPLAY", "1") != "0"


class Recorder:
    """Set as Runtime._rec while a pass is recorded: the Runtime reports every command and pool buffer to it."""

    def __init__(self):
        self.thread = threading.get_ident()
        self.commands = []  # ("k", kernel, gsize, lsize, args) | ("fill", buf, pattern, nbytes) | ("copy", ...)
        self.taken = {}  # id(buf) -> (buf, capacity): pool buffers handed out during the pass
        self.why_not = None  # the first reason the pass cannot be replayed

    def _here(self, what):
        if threading.get_ident() != self.thread:
            self.refuse(f"{what} from another thread")
            return False
        return True

    def refuse(self, why):
        self.why_not = self.why_not or why

    def on_launch(self, kernel, gsize, lsize, args):
        if self._here("a kernel launch"):
            self.commands.append(("k", kernel, gsize, lsize, list(args)))

    def on_fill(self, buf, pattern, nbytes):
        if self._here("a buffer fill"):
            self.commands.append(("fill", buf, pattern, nbytes))

    def on_copy(self, src, dst, nbytes):
        if self._here("a buffer copy"):
            self.commands.append(("copy", src, dst, nbytes))

    def on_take(self, buf, capacity):
        if self._here("a pool allocation"):
            self.taken[id(buf)] = (buf, capacity)


class _Input:
    """Stands for an input buffer in a recorded command: replaced by the call's own input at each replay."""

    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name


class Replay:
    """The commands of one recorded pass, ready to send again."""

    def __init__(self, rt, commands, reserved, inputs, outputs, check):
        self.rt = rt
        self.reserved = reserved  # [(buf, capacity)]: out of the pool while this replay exists
        self.inputs = inputs  # name -> [(kernel, argument index)] to point at the call's input
        self.commands = commands
        self.outputs = outputs  # name -> (buffer | _Input, shape, dtype)
        self.check = check  # () -> bool: the parameters are still the recorded ones

    def run(self, feeds):
        """The outputs for feeds {name: DeviceArray} (new pooled arrays the caller owns)."""
        rt = self.rt
        cl, q = rt.cl, rt.queue
        bufs = {name: feeds[name].buf for name in self.inputs}
        for name, slots in self.inputs.items():
            for kernel, i in slots:
                kernel.set_arg(i, bufs[name])
        enqueue = cl.enqueue_nd_range_kernel
        try:
            for c in self.commands:
                if c[0] == "k":
                    enqueue(q, c[1], c[2], c[3])
                elif c[0] == "fill":
                    cl.enqueue_fill_buffer(q, c[1], c[2], 0, c[3])
                else:
                    src, dst = (bufs[b.name] if isinstance(b, _Input) else b for b in c[1:3])
                    cl.enqueue_copy(q, dst, src, byte_count=c[3])
            return self.copy_outputs(bufs)
        except cl.MemoryError as e:
            raise rt._oom(e) from e

    def copy_outputs(self, bufs):
        """Fresh pooled copies of the pass's outputs; bufs: {input name: buffer} for outputs that are inputs."""
        return {name: self.rt.copy(DeviceArray(self.rt, bufs[src.name] if isinstance(src, _Input) else src, shape,
                                               dtype))
                for name, (src, shape, dtype) in self.outputs.items()}

    def close(self):
        """Give the reserved buffers back to the pool (after commands already queued: the queue is in order)."""
        for buf, cap in self.reserved:
            self.rt.pool_return(buf, cap)
        self.reserved = []

    def __del__(self):
        # The garbage collector may run this inside Runtime.empty, which holds the pool's lock: the buffers wait in
        # a list (extend is atomic) that the runtime drains before its next allocation.
        if self.reserved:
            self.rt.returned.extend(self.reserved)
            self.reserved = []


def finalize(rt, rec, feeds, out, check):
    """A Replay from a finished recording of a pass that read feeds {name: DeviceArray} and returned out, or
    (None, reason). On success the output arrays' buffers belong to the replay (they are no longer pooled)."""
    if rec.why_not:
        return None, rec.why_not
    feed_of = {}
    for name, arr in feeds.items():
        if id(arr.buf) in feed_of:
            return None, "two inputs share a buffer"
        feed_of[id(arr.buf)] = name
    free = rt.pool_ids()
    out_ids = {id(v.buf) for v in out.values() if id(v.buf) in rec.taken}
    held = [b for k, (b, _cap) in rec.taken.items() if k not in free and k not in out_ids]
    if held:
        return None, f"{len(held)} buffer(s) it used are held elsewhere"
    if any(id(v.buf) in out_ids and not v._pooled for v in out.values()):
        return None, "an output is a view of a pass buffer"  # its base could be released by its owner meanwhile
    commands, inputs = [], {name: [] for name in feeds}
    cl = rt.cl
    for c in rec.commands:
        if c[0] == "k":
            _tag, kernel, gsize, lsize, args = c
            k = rt.kernel_copy(kernel)  # its own object: the arguments stay set
            if k is None:
                return None, "it launched a kernel the runtime did not build"
            k.set_scalar_arg_dtypes([a.dtype if isinstance(a, np.generic) else None for a in args])
            k.set_args(*args)
            for i, a in enumerate(args):
                if isinstance(a, cl.MemoryObjectHolder) and id(a) in feed_of:
                    inputs[feed_of[id(a)]].append((k, i))
            commands.append(("k", k, gsize, lsize))
        elif c[0] == "fill":
            if id(c[1]) in feed_of:
                return None, "it overwrites an input"
            commands.append(c)
        else:
            src, dst = (_Input(feed_of[id(b)]) if id(b) in feed_of else b for b in c[1:3])
            if isinstance(dst, _Input):
                return None, "it overwrites an input"
            commands.append(("copy", src, dst, c[3]))
    outputs = {}
    for name, v in out.items():
        src = _Input(feed_of[id(v.buf)]) if id(v.buf) in feed_of else v.buf
        outputs[name] = (src, v.shape, v.dtype)
    reserved = [rt.pool_take(b, cap) for k, (b, cap) in rec.taken.items() if k in free]
    reserved += list({id(v.buf): (v.buf, v.capacity) for v in out.values() if id(v.buf) in out_ids}.values())
    for v in out.values():
        if id(v.buf) in out_ids:
            v._pooled = False  # the replay owns its buffer now
    return Replay(rt, commands, reserved, inputs, outputs, check), None


class Replayer:
    """An Executor's inference passes: run op by op, recorded once the shapes are warm, then replayed."""

    def __init__(self, executor):
        self._ex = weakref.ref(executor)  # the executor owns its replayer; no cycle, so dropping it frees the buffers
        self.be, self.graph = executor.be, executor.graph
        self.rt = executor.be.rt
        self.replays = {}  # key -> Replay
        self.calls = {}  # key -> number of calls seen
        self.attempts = {}  # key -> recordings tried
        self.last_refusal = None  # why the last recording could not be replayed (tests, --verbose diagnostics)
        self.paused = False  # Executor.per_node_times: every op must run through the (timed) Python path

    def _check(self):
        be, graph = self.be, self.graph
        gen = be.generation
        params = [(n.params, k, v) for n in graph.param_nodes() for k, v in n.params.items()]
        return lambda: be.generation == gen and all(d.get(k) is v for d, k, v in params)

    def forward(self, feeds, want):
        be = self.be
        dev = {k: be.asarray(v) for k, v in feeds.items()}
        uploaded = [d for k, d in dev.items() if d is not feeds[k]]
        key = (tuple(sorted((k, d.shape, d.dtype.str) for k, d in dev.items())), tuple(want))
        try:
            rp = self.replays.get(key)
            if rp is not None and not rp.check():
                rp.close()
                del self.replays[key]
                rp = None
            if rp is not None and not self.paused:
                return rp.run(dev)
            n = self.calls[key] = self.calls.get(key, 0) + 1
            if (self.paused or n <= RECORD_AFTER or len(self.replays) >= MAX_RECORDINGS
                    or self.attempts.get(key, 0) >= RECORD_ATTEMPTS or self.rt._rec is not None):
                return self._ex()._run(dev, False, want)
            return self._record(key, dev, want)
        finally:
            for d in uploaded:
                be.release(d)  # after the commands that read it (in-order queue)

    def _record(self, key, dev, want):
        self.attempts[key] = self.attempts.get(key, 0) + 1
        check = self._check()
        rec = self.rt._rec = Recorder()
        try:
            out = self._ex()._run(dev, False, want)
        finally:
            self.rt._rec = None
        rp, why = finalize(self.rt, rec, dev, out, check)
        self.last_refusal = why
        if rp is None:
            return out
        self.replays[key] = rp
        return rp.copy_outputs({n: d.buf for n, d in dev.items()})

    def close(self):
        for rp in self.replays.values():
            rp.close()
        self.replays.clear()


def make_replayer(executor):
    """A Replayer where the backend is OpenCL and replays are on, else None."""
    if not enabled() or not hasattr(executor.be, "rt"):
        return None
    return Replayer(executor)
