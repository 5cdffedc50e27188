"""Checkpoint export/load on a real (small, random-weight) Llama: round trips and refusals."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

import fqcompile
from fqcompile import sources
from fqcompile.errors import FqError
from fqcompile.flex_linear import FlexLinear
from fqcompile.formats import checkpoint as ckpt
from fqcompile.formats.nested import quantize_rtn
from fqcompile.processes import python_command


@pytest.mark.parametrize("grid", ["zero-exact", "lowest-rung"])
def test_loaded_layers_equal_float64_slices_of_source_weights(tiny_dir, tiny_ckpt, oracle_weight, grid, tmp_path):
    """Both format versions: the default (1, lowest-rung, as written before format 2) and 2 (zero-exact)."""
    source, _, _ = sources.load(str(tiny_dir))
    folder = tiny_ckpt if grid == "lowest-rung" else fqcompile.export(
        str(tiny_dir), tmp_path / "v2", ladder=(4, 8), group_size=32, grid=grid, progress=False)
    loaded = fqcompile.load(folder)
    assert loaded.manifest["grid"] == grid and loaded.manifest["format_version"] == {"zero-exact": 2}.get(grid, 1)
    offset = loaded.manifest.get("zero_offset", 0)
    layers = {n: m for n, m in loaded.model.named_modules() if isinstance(m, FlexLinear)}
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down per block
    x = torch.randn(3, 196, generator=torch.Generator().manual_seed(0))
    for name, layer in layers.items():
        w = source.get_submodule(name).weight
        codes, scale, zero = quantize_rtn(w, 32, (4, 8), grid)
        for bits in (4, 8):
            layer.set_precision(bits)
            xin = x[:, : layer.in_features]
            ref = xin.double() @ oracle_weight(codes, scale, zero, (4, 8), bits, 32, grid, offset).T
            assert (layer(xin).double() - ref).norm() <= 1e-5 * ref.norm()
    # everything unquantized is bit-identical, and lm_head is tied again
    for name, p in source.named_parameters():
        if not any(name.startswith(n + ".") for n in layers):
            assert torch.equal(loaded.model.get_parameter(name), p), name
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight


def test_logits_track_the_source_model(tiny_dir, tiny_ckpt):
    source, _, _ = sources.load(str(tiny_dir))
    loaded = fqcompile.load(tiny_ckpt)
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
    ref = source(ids).logits
    errors = {}
    for bits in (8, 4):
        fqcompile.set_precision(loaded.model, bits)
        errors[bits] = ((loaded.model(ids).logits - ref).norm() / ref.norm()).item()
    # the 8-bit step is 1/16 of the 4-bit one: its error must be an order of magnitude smaller
    assert errors[8] < errors[4] / 8 and errors[4] < 0.3, errors


def test_export_is_byte_identical(tiny_dir, tiny_ckpt, tmp_path):
    again = fqcompile.export(str(tiny_dir), tmp_path / "again", ladder=(4, 8), group_size=32, progress=False)
    for name in os.listdir(tiny_ckpt):
        if name.endswith(".safetensors"):
            assert (tiny_ckpt / name).read_bytes() == (again / name).read_bytes(), name
    first, second = ckpt.read_manifest(tiny_ckpt), ckpt.read_manifest(again)
    assert first["files"] == second["files"]


def test_manifest_describes_the_files(tiny_ckpt):
    manifest = ckpt.read_manifest(tiny_ckpt)
    assert manifest["ladder"] == [4, 8] and manifest["plane_widths"] == [4, 4]
    assert set(manifest["files"]) >= {"config.json", "tokenizer.json", ckpt.DENSE, ckpt.META, ckpt.POLICY,
                                      "plane-0.safetensors", "plane-1.safetensors"}
    assert json.loads((tiny_ckpt / ckpt.POLICY).read_text()) == {"kind": "static", "precision": 8}
    ckpt.verify(tiny_ckpt, manifest)  # hashes match
    # precision 4 reads the top plane only, and about half the quantized bytes of precision 8
    assert "plane-1.safetensors" not in ckpt.files_for(manifest, 4)
    stats = ckpt.precision_stats(manifest)
    plane_bytes = [manifest["files"][f"plane-{i}.safetensors"]["bytes"] for i in range(2)]
    assert stats[8]["quantized_bytes"] - stats[4]["quantized_bytes"] <= plane_bytes[1]
    layouts = ckpt.layouts(manifest).values()
    weights = sum(x.out_features * x.in_features for x in layouts)
    for bits in (4, 8):  # b bits per (padded) code + fp16 scale and uint8 zero per group
        expected = sum(x.out_features * (bits * x.padded_in + 24 * x.n_groups) for x in layouts) / weights
        assert stats[bits]["bits_per_weight"] == pytest.approx(expected, rel=1e-12)


def test_static_low_precision_never_reads_unused_planes(ckpt_copy):
    (ckpt_copy / "plane-1.safetensors").unlink()
    loaded = fqcompile.load(ckpt_copy, precision=4)
    layers = [m for m in loaded.model.modules() if isinstance(m, FlexLinear)]
    assert all(m.n_planes == 1 and m.precision == 4 for m in layers)
    assert not any(hasattr(m, "plane1") for m in layers)
    with pytest.raises(FqError, match="not available"):
        fqcompile.set_precision(loaded.model, 8)
    with pytest.raises(FqError, match="missing plane-1"):
        fqcompile.load(ckpt_copy)


def _damage_truncate(folder):
    path = folder / "plane-0.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def _damage_alter(folder):
    path = folder / ckpt.META
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


def _damage_missing(folder):
    (folder / ckpt.DENSE).unlink()


def _damage_version(folder):
    manifest = json.loads((folder / ckpt.MANIFEST).read_text())
    manifest["format_version"] = 99
    (folder / ckpt.MANIFEST).write_text(json.dumps(manifest))


def _damage_grid(folder, **changes):
    manifest = json.loads((folder / ckpt.MANIFEST).read_text())
    (folder / ckpt.MANIFEST).write_text(json.dumps({**manifest, **changes}))


def _damage_manifest(folder):
    (folder / ckpt.MANIFEST).write_text("{not json")


@pytest.mark.parametrize("damage,message", [
    (_damage_truncate, "truncated"),
    (_damage_alter, "SHA-256"),
    (_damage_missing, "missing dense.safetensors"),
    (_damage_version, "version 99 is not supported"),
    (_damage_manifest, "malformed"),
    (lambda folder: _damage_grid(folder, format_version=2), "lowest-rung for format version 2"),
    (lambda folder: _damage_grid(folder, format_version=2, grid="zero-exact", zero_offset=1.5), "`zero_offset` 1.5"),
    (lambda folder: _damage_grid(folder, format_version=2, grid="zero-exact", zero_offset=16),
     "`zero_offset` 16 is outside"),
])
def test_damaged_checkpoints_are_refused(ckpt_copy, damage, message):
    damage(ckpt_copy)
    with pytest.raises(FqError, match=message):
        fqcompile.load(ckpt_copy)


def test_existing_output_needs_force_and_must_be_ours(tiny_dir, tiny_ckpt, tmp_path):
    with pytest.raises(FqError, match="already exists"):
        fqcompile.export(str(tiny_dir), tiny_ckpt, group_size=32, progress=False)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    with pytest.raises(FqError, match="not an output of fqcompile"):
        fqcompile.export(str(tiny_dir), foreign, group_size=32, force=True, progress=False)
    assert (foreign / "notes.txt").read_text() == "precious"
    target = tmp_path / "ck"
    fqcompile.export(str(tiny_dir), target, ladder=(8,), group_size=32, progress=False)
    fqcompile.export(str(tiny_dir), target, ladder=(2, 4), group_size=32, force=True, progress=False)
    assert ckpt.read_manifest(target)["ladder"] == [2, 4]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no leftovers


def test_nan_weights_refused_and_nothing_written(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 7] = float("nan")
    bad = tmp_path / "nan-model"
    model.save_pretrained(bad)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(bad)
    out = tmp_path / "out"
    with pytest.raises(FqError, match="layers.1.mlp.up_proj.weight contains NaN"):
        fqcompile.export(str(bad), out, group_size=32, progress=False)
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_not_a_causal_lm_refused(tmp_path):
    from transformers import ViTConfig

    folder = tmp_path / "vit"
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(folder)
    with pytest.raises(FqError, match="not a causal language model"):
        fqcompile.export(str(folder), tmp_path / "out", progress=False)


@pytest.mark.parametrize("ladder", [(2, 3, 4, 6, 8), (3, 8)])
def test_any_ladder_exports_and_runs(tiny_dir, tmp_path, ladder):
    out = fqcompile.export(str(tiny_dir), tmp_path / "ck", ladder=ladder, group_size=32, progress=False)
    loaded = fqcompile.load(out)
    ids = torch.tensor([[1, 5, 9, 200, 31]])
    source, _, _ = sources.load(str(tiny_dir))
    ref = source(ids).logits
    errors = []
    for bits in ladder:
        fqcompile.set_precision(loaded.model, bits)
        logits = loaded.model(ids).logits
        assert torch.isfinite(logits).all()
        errors.append(((logits - ref).norm() / ref.norm()).item())
    assert errors == sorted(errors, reverse=True), errors  # more bits, closer to the source


@pytest.mark.slow
def test_killed_export_leaves_nothing_loadable(smol_dir, tmp_path):
    """SIGKILL an export of the built-in model while it writes: no valid checkpoint appears.

    The child is started as ours are, from the checkout; it must be seen writing (a file in
    its partial folder) before the kill, and a child that dies on its own fails the test."""
    out, log = tmp_path / "killed", tmp_path / "child-stderr.txt"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            python_command("-m", "fqcompile.cli", "export", "--model", str(smol_dir), "--out", str(out), "-q"),
            stdout=subprocess.DEVNULL, stderr=stderr, cwd=Path(__file__).resolve().parents[1],
        )
        writing, deadline = False, time.time() + 300
        while not writing and time.time() < deadline and proc.poll() is None:
            partial = [p for p in tmp_path.iterdir() if p.name.startswith(".killed.partial-")]
            writing = bool(partial) and any(partial[0].iterdir())
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert writing, f"the export child never started writing (exit {proc.returncode}): {log.read_text()[-2000:]}"
    assert proc.returncode == -signal.SIGKILL, f"export ended on its own (exit {proc.returncode}) before the kill"
    assert not out.exists()
    leftovers = list(tmp_path.iterdir())
    assert any(p.name.startswith(".killed.partial-") for p in leftovers)
    for leftover in leftovers:
        if leftover != log:
            with pytest.raises(FqError):
                fqcompile.load(leftover)
    # a rerun is not confused by the leftover
    fqcompile.export(str(smol_dir), out, progress=False)
    assert ckpt.read_manifest(Path(out))["ladder"] == [4, 8]


def test_bf16_model_keeps_its_dtype(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16).save_pretrained(bf16)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(bf16)
    out = fqcompile.export(str(bf16), tmp_path / "ck", ladder=(4, 8), group_size=32, progress=False)
    assert ckpt.read_manifest(out)["source"]["dtype"] == "bfloat16"
    dense = ckpt.load_tensors(out / ckpt.DENSE)
    assert all(t.dtype == torch.bfloat16 for t in dense.values())
    loaded = fqcompile.load(out)
    ids = torch.tensor([[1, 17, 300, 42]])
    logits = loaded.model(ids).logits
    ref = sources.load(str(bf16))[0](ids).logits  # the bf16 weights, computed in fp32
    assert logits.dtype == torch.bfloat16
    assert ((logits.float() - ref).norm() / ref.norm()) < 0.05


def test_other_architecture_with_computed_buffers(smol_dir, tmp_path):
    """Gemma3 recomputes buffers (RoPE, embedding scale) on load; loaded weights must survive that."""
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=16)
    source = Gemma3ForCausalLM(config).eval()
    source.save_pretrained(tmp_path / "gemma")
    AutoTokenizer.from_pretrained(smol_dir).save_pretrained(tmp_path / "gemma")
    out = fqcompile.export(str(tmp_path / "gemma"), tmp_path / "ck", ladder=(4, 8), group_size=32, progress=False)
    loaded = fqcompile.load(out)
    assert torch.equal(loaded.model.model.embed_tokens.weight, source.model.embed_tokens.weight)
    ids = torch.tensor([[1, 5, 9, 300, 20, 7]])
    ref = source(ids).logits
    assert ((loaded.model(ids).logits - ref).norm() / ref.norm()) < 0.05
