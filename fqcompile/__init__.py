"""fqcompile: switchable multi-precision (nested-bit) checkpoints for causal LMs.

Public API, in pipeline order:
    calibrate(model, out, dataset="self", target_bits=None)  -> the fitted switching policy
    export(model, out, ladder=(4, 8), group_size=128, calib=None)  -> checkpoint folder
    load(folder, precision=None)                        -> Loaded(model, tokenizer, manifest, folder)
    set_precision(model, bits); set_int8_activations(model, on=True)
    generate(loaded, prompt); evaluate(model, samples, ...)

The names are imported on first use, so `import fqcompile.cli` (and `fqcompile --help`)
does not pay for torch and transformers.
"""

import importlib

__version__ = "0.1.0"

# name -> module. The modules are named apart from the functions (exporter, not export): a
# submodule import binds its name on the package, which would hide a function of that name.
_API = {"FqError": "errors", "calibrate": "calibrator", "evaluate": "evaluation", "export": "exporter",
        "Loaded": "loader", "generate": "generation", "load": "loader", "set_int8_activations": "loader",
        "set_precision": "loader"}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'fqcompile' has no attribute '{name}'")
    value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_API])
