"""The command line's shared parts: one-line errors, options declared once, argument parsing.

Imports nothing heavy, so `fqcompile --help` and argument errors answer at once.
"""

import os
import re
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from . import files
from .errors import FqError

# The CLI's own output is the progress; libraries' sub-second bars and advice only clutter
# it. Set before they are imported (a user's own setting wins).
QUIET_LIBRARIES = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
                   "TRANSFORMERS_VERBOSITY": "error", "DATASETS_VERBOSITY": "error"}


class OneLineErrors(TyperGroup):
    """Every expected failure becomes one line on stderr and a non-zero exit (also under CliRunner)."""

    def main(self, args=None, prog_name=None, **extra):
        quiet_libraries()
        extra.pop("standalone_mode", None)
        try:
            code = super().main(args, prog_name or "fqcompile", standalone_mode=False, **extra)
        except typer.Abort:
            _fail("aborted", 130)
        except FqError as exc:
            _fail(as_flags(str(exc)), 2)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except typer.TyperException as exc:  # usage errors: unknown option, missing argument...
            _fail(exc.format_message(), getattr(exc, "exit_code", 2))
        except Exception as exc:  # a bug, not bad input: still one line unless asked for more
            if os.environ.get("FQCOMPILE_DEBUG"):
                raise
            _fail(f"internal error: {type(exc).__name__}: {exc} (FQCOMPILE_DEBUG=1 shows the traceback)", 1)
        sys.exit(code if isinstance(code, int) else 0)


def quiet_libraries() -> None:
    """Set the environment before the libraries are imported; those already imported (a test
    process, a notebook) are told directly."""
    for key, value in QUIET_LIBRARIES.items():
        os.environ.setdefault(key, value)
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
        sys.modules["datasets"].logging.set_verbosity_error()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
        sys.modules["transformers"].utils.logging.set_verbosity_error()


def as_flags(message: str) -> str:
    """Library errors name parameters in backquotes (`dataset`, `force=True`, `method='rtn'`):
    on the command line they are flags (--dataset, --force, --method rtn)."""
    def flag(match):
        name, value = "--" + match.group(1).replace("_", "-"), match.group(2)
        return name if value in (None, "True") else f"{name} {value.strip(chr(39))}"

    return re.sub(r"`(\w+)(?:=([^`\s]*))?`", flag, message)


def _fail(message: str, code: int):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


MODEL_HELP = "local HF folder, .gguf file, hub id (org/name), or the built-in 'smollm2-135m'"
POLICY_HELP = "dynamic | dynamic:BITS | static:B | static-mixed:BITS (default: the checkpoint's own policy)"

# Options shared by several commands, declared once.
JsonPath = Annotated[Optional[Path], typer.Option(
    "--json", help="also write the numbers to this JSON file (schema: docs/json.md)")]
QuantizedHead = Annotated[Optional[bool], typer.Option(
    "--quantized-head/--no-quantized-head",
    help="run the output head at 8 bits (round-to-nearest at load; checkpoints keep it in float): on small "
         "models the largest read of a decode step, for +0.03% perplexity on the built-in model "
         "(docs/bench-generate.md) [default: on for checkpoints]")]
Int8Activations = Annotated[Optional[bool], typer.Option(
    "--int8-activations/--no-int8-activations",
    help="quantize each quantized layer's inputs to int8 in blocks of 16: 2-3x faster decode on CPUs with "
         "AVX2 or AVX-512 VNNI, for +0.1% perplexity on the built-in model; on AVX2 the layers then hold their "
         "planes repacked 8 rows at a time (same size; docs/kernels.md) [default: on for checkpoints]")]


def fast_options(quantized_head: bool | None, int8_activations: bool | None) -> tuple[bool, bool]:
    """The serving options in force: both on unless turned off (their cost is within the noise)."""
    return quantized_head is not False, int8_activations is not False


def parse_ladder(text: str) -> tuple[int, ...]:
    from .formats.nested import check_ladder

    try:
        return check_ladder(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise FqError(f"ladder must be comma-separated integers like 4,8, got '{text}'") from None


def check_json_path(path: Path | None) -> None:
    """Refuse an unwritable --json path before the work, not after it."""
    if path is not None and (Path(path).is_dir() or not Path(path).parent.is_dir()):
        raise FqError(f"cannot write --json {path}: not a file in an existing folder")


def write_json(path: Path | None, data) -> None:
    if path is None:
        return
    try:
        files.write_json(Path(path), data, sort_keys=True)
    except OSError as exc:
        raise FqError(f"cannot write --json {path}: {exc.strerror or exc}") from None


def parse_rung_weights(text: str | None) -> dict[int, float]:
    if not text:
        return {}
    try:
        pairs = [part.split(":") for part in text.split(",") if part.strip()]
        return {int(b): float(w) for b, w in pairs}
    except ValueError:
        raise FqError(f"rung weights must look like 4:1,8:0.25 (precision:weight), got '{text}'") from None


def parse_percent(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text.rstrip("%")) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise FqError(f"expected a percentage like 1% or a fraction like 0.01, got '{text}'") from None


def policy_spec(policy: str | None, precision: int | None) -> str | None:
    """--policy, or --precision B as static:B."""
    if policy is not None and precision is not None:
        raise FqError("give --policy or --precision, not both")
    return f"static:{precision}" if precision is not None else policy
