"""A tiny per-device autotune cache: small JSON files under runtime.cache_dir("tuning").

Keys are free-form strings (the caller folds in what makes a choice valid: device name, driver version, kernel
source hash). A missing, unreadable or corrupt file reads as "not tuned yet"; writes are atomic so two processes
tuning at once never leave a half-written file.
"""
import hashlib
import json
import os

from .fsutil import write_json


def _path(rt, key):
    from .runtime import cache_dir

    h = hashlib.sha256(str(key).encode()).hexdigest()[:32]
    return os.path.join(cache_dir("tuning"), h + ".json")


def device_key(rt, *parts):
    """A cache key for this device and driver plus whatever else the caller names (e.g. a source hash)."""
    info = rt.info
    return "|".join([info.platform_name, info.name, info.driver_version] + [str(p) for p in parts])


def get(rt, key):
    """The stored value for key, or None when absent or unreadable."""
    try:
        with open(_path(rt, key), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != str(key):
        return None  # corrupt, or a hash collision with another key
    return data.get("value")


def put(rt, key, value):
    """Store a JSON-serialisable value for key (atomic write). Failure to write is not an error: tuning reruns."""
    try:
        write_json(_path(rt, key), {"key": str(key), "value": value})
        return True
    except OSError:
        return False
