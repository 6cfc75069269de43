"""User-facing errors: one paragraph naming the cause and the fix; the CLI turns them into exit code 2."""


class TclError(Exception):
    """An error caused by the user's input or environment, with a suggested fix."""

    exit_code = 2

    def __init__(self, message, fix=None):
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self):
        if self.fix:
            return f"{self.message} {self.fix}"
        return self.message


class DeviceError(TclError):
    """No OpenCL platform, no matching device, a failed kernel build, out of device memory."""


class RecipeError(TclError):
    """A recipe key is missing, unknown, of the wrong type, or names something that does not exist."""


class ModelError(TclError):
    """A model file cannot be read, or uses layers tcl does not support."""


class DataError(TclError):
    """A dataset folder is missing, empty, or unusable."""


class DamagedFile(TclError):
    """A file tcl wrote (weights, checkpoint, cache index, model.json) is truncated, corrupt or not tcl's."""


class TclNote(UserWarning):
    """Something the user must be told that is not an error (the CLI prints it as one 'note:' line on stderr)."""


def closest(name, candidates):
    """The candidate closest to `name`, for 'did you mean' hints (None when nothing is close)."""
    import difflib

    m = difflib.get_close_matches(str(name), [str(c) for c in candidates], n=1, cutoff=0.5)
    return m[0] if m else None
