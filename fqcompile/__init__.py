"""fqcompile: switchable multi-precision (nested-bit) checkpoints for causal LMs.

Public API:
    export(model, out, ladder=(4, 8), group_size=128)  -> checkpoint folder
    load(folder, precision=None)                        -> Loaded(model, tokenizer, manifest, folder)
    set_precision(model, bits); set_int8_activations(model, on=True)
    generate(loaded, prompt); evaluate(model, samples, ...)
"""

__version__ = "0.1.0"

from .errors import FqError  # noqa: E402
from .metrics import evaluate  # noqa: E402
from .export import export  # noqa: E402
from .runtime import Loaded, generate, load, set_int8_activations, set_precision  # noqa: E402

__all__ = ["FqError", "Loaded", "evaluate", "export", "generate", "load", "set_int8_activations", "set_precision"]
