"""TransferCL: fine-tune pretrained networks with OpenCL kernels.

The Python API (see api.py and the README's "Python API"): load_model, load_recipe, finetune, evaluate_model,
export_weights, Model.
Imported on first use, so `import transfercl_cli` stays instant (the CLI starts fast).
"""
__version__ = "0.1.0"

_API = ("Model", "load_model", "load_recipe", "finetune", "evaluate_model", "export_weights", "default_callbacks_for")


def __getattr__(name):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'transfercl_cli' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_API))
