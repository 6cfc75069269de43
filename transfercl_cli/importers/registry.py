"""Converter registries: one small function per source op type (a Keras layer class, an ONNX op type), grouped by
format, and the one place that enforces "an importer never drops what it does not understand".

    KERAS = Registry("Keras")

    @KERAS.register("Cropping2D")
    def cropping2d(ctx, layer, cfg, ins):   # cfg: a Tracked view of the layer's config / the node's attributes
        (top, bottom), (left, right) = cfg["cropping"]
        ...

`Registry.convert(kind, name, cfg, *args)` looks the converter up (an unknown kind is a ModelError naming the layer),
runs it, and then checks that every key of `cfg` was read by the converter, was declared irrelevant by it
(`cfg.ignore(...)`), or is one of the registry's keys that never change the math (names, dtypes, initializers).
A key left over is an error naming the layer, the key and its value: a converter that silently skipped, say, an
`axis` or a constant operand would give wrong outputs with no error, the worst defect an importer can have.
"""
from ..errors import ModelError


class Tracked:
    """A read-only mapping that records which keys were read (`[]`, `get`, `in`)."""

    def __init__(self, data, where=""):
        self._data = dict(data or {})
        self._read = set()
        self.where = where

    def __getitem__(self, key):
        self._read.add(key)
        return self._data[key]

    def get(self, key, default=None):
        self._read.add(key)
        return self._data.get(key, default)

    def __contains__(self, key):
        self._read.add(key)
        return key in self._data

    def keys(self):
        return self._data.keys()

    def raw(self):
        """The underlying dict, without marking anything read (for messages and for passing through whole)."""
        return self._data

    def ignore(self, *keys):
        """Declare keys irrelevant to this conversion (say why in a comment where it is called)."""
        self._read.update(keys)

    def unread(self):
        return [k for k in self._data if k not in self._read]


class Registry:
    def __init__(self, fmt, irrelevant=(), fix="Run `tcl inspect MODEL` to list unsupported layers."):
        self.fmt = fmt
        self.table = {}
        self.irrelevant = set(irrelevant)
        self.fix = fix

    def register(self, *kinds):
        def deco(fn):
            for k in kinds:
                self.table[k] = fn
            return fn

        return deco

    def __contains__(self, kind):
        return kind in self.table

    def problem(self, name, kind, err):
        """The cause of a ModelError raised while converting layer `name`, without the "FMT layer 'NAME' (KIND) "
        that check_all_read's message starts with (the importers list every problem under its layer)."""
        prefix = f"{self.fmt} layer '{name}' ({kind}) "
        return err.message[len(prefix):] if err.message.startswith(prefix) else err.message

    def convert(self, kind, name, cfg, *args, **kwargs):
        """Run the converter of `kind` for the layer/node `name`; `cfg` is a Tracked view of its settings."""
        fn = self.table.get(kind)
        if fn is None:
            raise ModelError(f"{self.fmt} layer '{name}' is of type '{kind}', which tcl cannot import.", self.fix)
        out = fn(*args, cfg=cfg, **kwargs)
        check_all_read(self.fmt, kind, name, cfg, self.irrelevant)
        return out


def check_all_read(fmt, kind, name, cfg, irrelevant=()):
    left = [k for k in cfg.unread() if k not in irrelevant]
    if left:
        k = left[0]
        v = repr(cfg.raw()[k])
        v = v if len(v) <= 120 else v[:117] + "..."
        more = f" (and {', '.join(left[1:])})" if len(left) > 1 else ""
        raise ModelError(f"{fmt} layer '{name}' ({kind}) has the setting {k}={v}{more}, which tcl's importer does not "
                         "understand; importing it anyway could give wrong outputs.",
                         "Cut the model before this layer (cut_after), or report the layer type and setting so "
                         "support can be added.")
