"""Sensitivity measurement: per-token KL(p_ref || p_q) with one unit lowered at a time.

The full-precision model gives, per calibration token, the reference distribution and its
entropy. Then, for every unit (a decoder block's linear layers, the linears that read one
input, or one linear layer) and
every lower precision of the ladder, the model runs with only that unit fake-quantized
(the same RTN codes `export` writes) and the per-token KL against the reference is kept.

Reuse: the hidden state entering block i does not depend on what happens in later
blocks, so it is captured once and the lowered run starts at the unit's block, not at
the embeddings (half a forward pass on average instead of a whole one).
"""

import contextlib
from dataclasses import dataclass

import torch
from rich.progress import Progress
from safetensors.torch import load_file, save_file
from torch import nn

from fqcompile.errors import FqError
from fqcompile.files import atomic_file
from fqcompile.formats.nested import CELL_CENTRE, Layout, dequantize, pack_planes, quantize_rtn
from fqcompile.calibration import policy as pol
from fqcompile.calibration.divergence import entropy, kl_per_token, log_probs


REF_CACHE_BYTES = 2 << 30


@dataclass(frozen=True)
class Unit:
    """A switching unit: its name, the block it starts in, and its linear layers."""

    name: str
    block: int
    modules: tuple[str, ...]


def units_of(model, linears: list[str], kind: str) -> list[Unit]:
    """Units in model order: 'block' groups the linears of each decoder layer, 'projection' the
    linears that read one input (q/k/v, gate/up: one kernel call once fused), 'linear' none."""
    layers = model.get_decoder().layers
    names = {id(m): n for n, m in model.named_modules()}
    block_name = {i: names[id(layer)] for i, layer in enumerate(layers)}
    by_block: dict[int, list[str]] = {}
    for name in linears:
        block = next((i for i, n in block_name.items() if name.startswith(n + ".")), None)
        if block is None:
            raise ValueError(f"{name} is outside the decoder layers")
        by_block.setdefault(block, []).append(name)
    if kind == "block":
        return [Unit(block_name[b], b, tuple(mods)) for b, mods in sorted(by_block.items())]
    if kind == "projection":
        source = shared_inputs(model, linears)
        return [Unit(pol.unit_label(mods), b, tuple(mods)) for b, block in sorted(by_block.items())
                for mods in _groups(block, source)]
    return [Unit(m, b, (m,)) for b, mods in sorted(by_block.items()) for m in mods]


def _groups(names: list[str], source: dict) -> list[list[str]]:
    groups: dict = {}
    for name in names:
        groups.setdefault(source[name], []).append(name)
    return list(groups.values())


@torch.inference_mode()
def shared_inputs(model, linears: list[str]) -> dict[str, int]:
    """Per linear, the first linear (by index) whose forward received the same input tensor."""
    seen: dict[str, torch.Tensor] = {}  # the inputs themselves: alive, so no two share an id()
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda _m, a, n=n: seen.setdefault(n, a[0]))
             for n in linears]
    try:
        model(torch.zeros(1, 2, dtype=torch.long), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    first: dict[int, int] = {}
    return {n: first.setdefault(id(seen[n]), i) for i, n in enumerate(linears)}


def fake_quantized(weight: torch.Tensor, group_size: int, ladder, bits: int, grid: str = CELL_CENTRE) -> torch.Tensor:
    """The b-bit slice of the nested RTN codes of `weight` on `grid`, dense (exactly what an RTN export serves)."""
    layout = Layout(weight.shape[0], weight.shape[1], group_size, tuple(ladder), grid)
    codes, scale, zero = quantize_rtn(weight, group_size, layout.ladder, layout.grid)
    return dequantize(pack_planes(codes, layout), scale, zero, layout, bits, dtype=weight.dtype)


def rtn_slices(model, group_size: int, ladder, grid: str = CELL_CENTRE):
    """slice_of(module name, bits) -> dense weight: RTN slices of the model's own weights."""
    return lambda name, bits: fake_quantized(model.get_submodule(name).weight, group_size, ladder, bits, grid)


@contextlib.contextmanager
def layers_from(model, start: int):
    """Run the decoder from layer `start` on: feed that layer's input as `inputs_embeds`."""
    decoder = model.get_decoder()
    full = decoder.layers
    decoder.layers = nn.ModuleList(list(full)[start:])
    try:
        yield
    finally:
        decoder.layers = full


@contextlib.contextmanager
def swapped_weights(model, weights: dict[str, torch.Tensor]):
    """Temporarily replace linear weights (no copies of the originals are made)."""
    originals = {}
    try:
        for name, w in weights.items():
            module = model.get_submodule(name)
            originals[name] = module.weight
            module.weight = nn.Parameter(w, requires_grad=False)
        yield
    finally:
        for name, w in originals.items():
            model.get_submodule(name).weight = w


@torch.inference_mode()
def capture(model, batch: torch.Tensor):
    """Reference pass: (input of every decoder layer, output of the last one) for a batch.

    The last layer's output is fed through `run_from(model, n_layers, ...)` to get the
    reference logits again (final norm, head and any logit post-processing included).
    """
    layers = model.get_decoder().layers
    inputs: list[torch.Tensor] = [None] * len(layers)
    final: list[torch.Tensor] = []
    hooks = []

    def grab(i):
        def hook(_module, args, kwargs):
            inputs[i] = args[0] if args else kwargs["hidden_states"]

        return hook

    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(grab(i), with_kwargs=True))
    hooks.append(model.get_decoder().norm.register_forward_pre_hook(lambda _m, a: final.append(a[0])))
    try:
        model(batch, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return inputs, final[0]


@torch.inference_mode()
def run_from(model, start: int, hidden: torch.Tensor) -> torch.Tensor:
    with layers_from(model, start):
        return model(inputs_embeds=hidden, use_cache=False).logits


def save_atomic(path, tensors: dict[str, torch.Tensor]) -> None:
    """A results file appears whole or not at all (resume trusts every file it finds)."""
    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))


@torch.inference_mode()
def measure(model, samples, units, ladder, slice_of, folder, batch_size=4, progress=True):
    """Measure every unit at every lower precision; results saved per unit as they finish.

    Files in `folder`: reference.safetensors (entropy and NLL of the reference per token),
    baseline.safetensors (KL with every unit at the top precision), units/NNN.safetensors
    (kl_<b> per lower precision b). Units whose file exists are skipped (resume).
    """
    (folder / "units").mkdir(parents=True, exist_ok=True)
    batches = [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
    n_layers = len(model.get_decoder().layers)
    captured = [capture(model, b) for b in batches]
    # Reference log-probs are needed once per unit and batch: keep them when they fit in
    # REF_CACHE_BYTES (SmolLM2, 8k tokens: 1.6 GB), else recompute them from the last layer.
    vocab = model.get_output_embeddings().weight.shape[0]
    cache = {} if samples[:, 1:].numel() * vocab * 4 <= REF_CACHE_BYTES else None

    def ref_lps(i):
        if cache is not None and i in cache:
            return cache[i]
        lp = log_probs(run_from(model, n_layers, captured[i][1]))
        if cache is not None:
            cache[i] = lp
        return lp

    ref_file = folder / "reference.safetensors"
    if not ref_file.exists():
        ent, nll = [], []
        for i, batch in enumerate(batches):
            lp = ref_lps(i)
            ent.append(entropy(lp))
            nll.append(-lp.gather(-1, batch[:, 1:, None])[..., 0])
        save_atomic(ref_file, {"entropy": torch.cat(ent), "nll": torch.cat(nll)})

    linears = [m for u in units for m in u.modules]
    top = ladder[-1]
    base_file = folder / "baseline.safetensors"
    if not base_file.exists():
        weights = {m: slice_of(m, top) for m in linears}
        with swapped_weights(model, weights):
            kl = [kl_per_token(ref_lps(i), log_probs(model(b, use_cache=False).logits)) for i, b in enumerate(batches)]
        save_atomic(base_file, {"kl": torch.cat(kl)})

    todo = [(i, u) for i, u in enumerate(units) if not (folder / "units" / f"{i:03d}.safetensors").exists()]
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task(f"measuring {len(units)} units x {len(ladder) - 1} precisions", total=len(units),
                            completed=len(units) - len(todo))
        for index, unit in todo:
            lowered = {b: {m: slice_of(m, b) for m in unit.modules} for b in ladder[:-1]}
            kls = {b: [] for b in lowered}
            for i in range(len(batches)):
                ref = ref_lps(i)
                for b, weights in lowered.items():
                    with swapped_weights(model, weights):
                        kls[b].append(kl_per_token(ref, log_probs(run_from(model, unit.block, captured[i][0][unit.block]))))
            save_atomic(folder / "units" / f"{index:03d}.safetensors", {f"kl_{b}": torch.cat(v) for b, v in kls.items()})
            bar.advance(task)

    try:
        return {
            "reference": load_file(str(ref_file)),
            "baseline": load_file(str(base_file))["kl"],
            "units": [load_file(str(folder / "units" / f"{i:03d}.safetensors")) for i in range(len(units))],
        }
    except Exception as exc:  # a damaged results file: say which, do not guess
        raise FqError(f"calibration results in {folder} are unreadable ({exc}); delete that folder's units/ to remeasure") from None
