"""Block-by-block GPTQ: one decoder block in memory at a time, fed by the quantized blocks before it.

The model is built on the meta device. Only the input embeddings (to make the first
block's inputs) and one decoder block at a time are read from the safetensors files.
In each block the linear layers are grouped by the input they share (Llama: q/k/v, o,
gate/up, down), found by running the block once. Group by group ("true sequential"),
the Hessian H = Σ xxᵀ of the group's input is accumulated over the calibration samples
with the earlier groups already quantized (or, not true-sequential, all Hessians are
taken first from the float weights), and the group's layers are quantized
together (they share H, so one GPTQ pass over their stacked rows does them all). The
block's outputs, computed with its weights at the `propagate` rung, are the next
block's inputs. Peak memory: one block in fp32, the calibration activations entering and
leaving one block, and the packed codes.
"""

import json
import resource
from pathlib import Path

import torch
from rich.progress import Progress
from safetensors import safe_open

from fqcompile.calibration import gptq
from fqcompile.errors import FqError
from fqcompile.formats.nested import Layout, decode_codes
from fqcompile.sources import materialize_buffers


class _Stop(Exception):
    """Raised by a hook to end a forward pass once what it needs is captured."""


def weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it (single file or sharded index)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            return {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        except (ValueError, KeyError):
            raise FqError(f"{index} is not a valid safetensors index") from None
    single = folder / "model.safetensors"
    if not single.is_file():
        raise FqError(f"{folder} holds no safetensors weights (model.safetensors or an index)")
    with safe_open(str(single), "pt") as f:
        return dict.fromkeys(f.keys(), single)


def read_tensors(files: dict[str, Path], names) -> dict[str, torch.Tensor]:
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    out = {}
    for path, keys in by_file.items():
        with safe_open(str(path), "pt") as f:
            out.update({k: f.get_tensor(k) for k in keys})
    return out


def materialize(model, prefix: str, files: dict[str, Path]) -> torch.nn.Module:
    """Load the submodule `prefix` from the files, in float32; the rest stays on meta."""
    module = model.get_submodule(prefix)
    names = [n for n in files if n.startswith(prefix + ".")]
    tensors = {n[len(prefix) + 1 :]: t.float() if t.is_floating_point() else t for n, t in read_tensors(files, names).items()}
    try:
        module.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as exc:
        raise FqError(f"the weights under '{prefix}' do not match the model built from config.json "
                      f"({str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else exc}); "
                      f"use `method='rtn'`") from None
    return module


def _call(block, hidden, kwargs):
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


class _Record(torch.nn.Module):
    """Stands in for decoder block `index` during first_inputs: keeps what the model passes it."""

    def __init__(self, index: int, last: int, hidden: list, kwargs: list[list[dict]]):
        super().__init__()
        self.index, self.last, self.hidden, self.kwargs = index, last, hidden, kwargs

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if self.index == 0:
            self.hidden.append(hidden.float())
        self.kwargs[self.index].append(kwargs)
        if self.index == self.last:
            raise _Stop
        return hidden


@torch.inference_mode()
def first_inputs(model, samples: torch.Tensor, batch_size: int) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """The hidden states entering the first decoder block, per batch, and every block's keyword
    arguments, per block and batch: local and global layers get different masks and RoPE
    tables (Gemma 3). The blocks are swapped for recorders meanwhile (their weights are on meta)."""
    layers = model.get_decoder().layers
    blocks = list(layers)
    hidden, kwargs = [], [[] for _ in blocks]
    last = min(len(blocks), getattr(model.config, "num_hidden_layers", None) or len(blocks)) - 1  # the last it calls
    for i in range(len(blocks)):
        layers[i] = _Record(i, last, hidden, kwargs)
    try:
        for start in range(0, len(samples), batch_size):
            try:
                model(samples[start : start + batch_size], use_cache=False)
            except _Stop:
                pass
    finally:
        for i, block in enumerate(blocks):
            layers[i] = block
    if not all(len(k) == len(hidden) for k in kwargs):  # e.g. a config naming fewer layers than the model holds
        raise FqError("could not record the inputs of every decoder block; use `method='rtn'`")
    return hidden, kwargs


@torch.inference_mode()
def input_groups(block, names: list[str], hidden, kwargs) -> list[list[str]]:
    """The block's linear layers grouped by shared input, in the order they run."""
    inputs: list[torch.Tensor] = []  # held, so no later input can reuse an earlier one's memory
    groups: list[list[str]] = []

    def seen(name):
        def hook(_module, args):
            for x, group in zip(inputs, groups):
                if x is args[0]:
                    group.append(name)
                    return
            inputs.append(args[0])
            groups.append([name])

        return hook

    hooks = [block.get_submodule(n).register_forward_pre_hook(seen(n)) for n in names]
    try:
        _call(block, hidden, kwargs)
    finally:
        for h in hooks:
            h.remove()
    found = [n for g in groups for n in g]
    if sorted(found) != sorted(names):
        raise FqError(f"could not trace every linear layer of a decoder block (not called once each: "
                      f"{', '.join(sorted(set(names) ^ set(found)) or names)}); use `method='rtn'`")
    return groups


@torch.inference_mode()
def hessian(block, linear, inputs) -> torch.Tensor:
    """H = mean of xxᵀ over every calibration token entering `linear` (forward stops there)."""
    k = linear.in_features
    h = torch.zeros(k, k)
    rows = 0

    def add(_module, args):
        nonlocal rows
        x = args[0].reshape(-1, k).float()
        h.addmm_(x.T, x)
        rows += len(x)
        raise _Stop

    hook = linear.register_forward_pre_hook(add)
    try:
        for hidden, kwargs in inputs:
            try:
                _call(block, hidden, kwargs)
            except _Stop:
                pass
    finally:
        hook.remove()
    return h / max(rows, 1)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def rss_mib() -> float | None:
    """Resident memory now (Linux), to tell the fixed cost of the process from the peak."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    return int(text.split("VmRSS:")[1].split()[0]) / 1024


@torch.inference_mode()
def quantize_model(model, files, targets: list[str], samples, ladder, group_size, grid: str, config: gptq.GPTQConfig,
                   batch_size: int = 8, progress: bool = True):
    """GPTQ every linear in `targets` block by block (module doc).

    `model` is on the meta device. Returns ({name: gptq.Quantized}, log) where the log
    holds each layer's relative output error per rung (GPTQ and RTN) and the peak memory.
    """
    before = rss_mib()
    propagate = ladder[0] if config.propagate is None else config.propagate
    true_sequential = config.true_sequential
    if propagate not in ladder:
        raise FqError(f"propagate precision {propagate} is not in the ladder {list(ladder)}")
    decoder = model.get_decoder()
    layer_names = {id(layer): n for n, layer in model.named_modules() if any(layer is x for x in decoder.layers)}
    outside = [t for t in targets if not any(t.startswith(p + ".") for p in layer_names.values())]
    if outside:
        raise FqError(f"GPTQ quantizes linear layers inside decoder blocks only, not {outside[0]}; use `method='rtn'`")
    embed = model.get_input_embeddings()
    embed_name = next(n for n, m in model.named_modules() if m is embed)
    materialize(model, embed_name, files)
    materialize_buffers(model)
    hidden, block_kwargs = first_inputs(model, samples, batch_size)
    embed.to("meta")

    results, log = {}, {"layers": {}, "rss_before_mib": before}
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task("GPTQ", total=len(decoder.layers))
        for index, layer in enumerate(decoder.layers):
            prefix = layer_names[id(layer)]
            mine = [t[len(prefix) + 1 :] for t in targets if t.startswith(prefix + ".")]
            bar.update(task, description=f"GPTQ block {index + 1}/{len(decoder.layers)}")
            block = materialize(model, prefix, files)
            inputs = list(zip(hidden, block_kwargs[index]))
            groups = input_groups(block, mine, *inputs[0]) if mine else []
            # not true-sequential: every Hessian from the block's float weights, taken up front
            early = {} if true_sequential else {g[0]: hessian(block, block.get_submodule(g[0]), inputs) for g in groups}
            for group in groups:
                linears = [block.get_submodule(n) for n in group]
                h = early[group[0]] if early else hessian(block, linears[0], inputs)
                stacked = torch.cat([m.weight for m in linears])
                layout = Layout(*stacked.shape, group_size, ladder, grid)
                q, weights, _ = gptq.balance(stacked, h, layout, config)
                row = 0
                for name, m in zip(group, linears):
                    rows = slice(row, row + m.out_features)
                    row += m.out_features
                    part = gptq.Quantized(q.codes[rows].clone(), q.scale[rows].clone(), q.zero[rows].clone(), q.order.clone(),
                                          q.damp)
                    full = f"{prefix}.{name}"
                    results[full] = part
                    log["layers"][full] = {"loss": gptq.losses(m.weight, part, h, layout), "damp": q.damp,
                                           "rung_weights": weights}
                    m.weight.copy_(decode_codes(part.codes, part.scale, part.zero, layout, propagate))
            hidden = [_call(block, h, kwargs) for h, kwargs in inputs]
            block.to("meta")
            bar.advance(task)
    log["peak_rss_mib"] = round(peak_rss_mib(), 1)
    fp32 = sum(t.numel() for t in [*model.parameters(), *model.buffers()]) * 4 / 2**20
    log["model_fp32_mib"] = round(fp32, 1)  # what loading the whole model would add
    return results, log
