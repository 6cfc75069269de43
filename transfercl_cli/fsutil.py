"""Atomic file writes: a crash or Ctrl-C never leaves a half-written output behind."""
import contextlib
import json
import os
import tempfile


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; on success it is renamed over `path`, on failure removed."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    os.close(fd)
    # mkstemp creates 0600 files; outputs get the usual umask-based permissions instead.
    um = os.umask(0)
    os.umask(um)
    os.chmod(tmp, 0o666 & ~um)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def jsonable(v, finite=False):
    """Plain JSON types: tuples and numpy arrays become lists, numpy scalars numbers, paths strings, unknown objects
    their str(). With finite=True, NaN and infinities become None (strict JSON, for reports)."""
    import math

    import numpy as np

    if isinstance(v, dict):
        return {str(k): jsonable(x, finite) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x, finite) for x in v]
    if isinstance(v, np.ndarray):
        return jsonable(v.tolist(), finite)
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float):
        return None if finite and not math.isfinite(v) else v
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    return str(v)


def write_text(path, text):
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            _sync(f)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_npz(path, arrays):
    """np.savez to a temp file, then rename (np.savez appends .npz to names without it, so keep the suffix)."""
    import numpy as np

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            _sync(f)


def _sync(f):
    """Data on disk before the rename that publishes it: after a power cut the new name never points at an empty
    or partial file."""
    f.flush()
    os.fsync(f.fileno())


def _damaged(path, what, cause, fix):
    from .errors import DamagedFile

    return DamagedFile(f"The {what} '{path}' is damaged or not a file tcl wrote ({cause}).", fix)


def load_npz(path, what="weights file", fix=None):
    """Every array of an .npz, never unpickling: an object array, a truncated archive or a file that is not an
    .npz becomes one clear error (errors.DamagedFile) naming the file, instead of numpy's exception."""
    import zipfile
    import zlib

    import numpy as np

    fix = fix or "Restore the file from a copy, or re-create it (re-run `tcl finetune`, or `--force` to start over)."
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise
    except ValueError as e:
        if "pickle" in str(e).lower() or "object" in str(e).lower():
            raise _damaged(path, what, "it holds Python objects, which tcl never unpickles, for safety", fix) from e
        raise _damaged(path, what, str(e) or type(e).__name__, fix) from e
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, KeyError) as e:
        raise _damaged(path, what, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__, fix) from e


def load_json(path, what="file", fix=None):
    """A JSON file tcl wrote; truncated, not UTF-8 or not JSON becomes errors.DamagedFile naming the file."""
    fix = fix or "Restore the file from a copy, or re-create it (re-run `tcl finetune`, or `--force` to start over)."
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        raise _damaged(path, what, str(e).splitlines()[0] if str(e) else type(e).__name__, fix) from e
