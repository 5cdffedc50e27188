"""GPTQ export: every plan read back equals the nested slices it came from, the bytes are GPTQ's,
the config's widths (`dynamic` included) are what the plan says, and bad requests are refused."""

import json

import pytest
import torch
from safetensors import safe_open

import fqcompile
from fqcompile.calibrator import calibrate
from fqcompile.controller import resolve
from fqcompile.errors import FqError
from fqcompile.formats import gptq_format
from fqcompile.formats.nested import dequantize
from fqcompile.gptq_export import FUSED, RECORD, dense_model, export_gptq, stored_width


@pytest.fixture(scope="module")
def zero_exact(tmp_path_factory, tiny_dir, austen):
    """The tiny model on the zero-exact grid, [4, 8], with a per-linear calibrated policy."""
    work = tmp_path_factory.mktemp("gptq-export")
    calibrate(str(tiny_dir), work / "calib", dataset=str(austen / "emma.txt"), unit="linear", grid="zero-exact",
              samples=6, eval_samples=2, seq_len=48, group_size=32, buckets=3, batch_size=3, progress=False)
    return fqcompile.export(str(tiny_dir), work / "ckpt", ladder=(4, 8), group_size=32, grid="zero-exact",
                            method="rtn", calib=work / "calib", progress=False)


def slices(folder, bits: dict[str, int]) -> dict[str, torch.Tensor]:
    """Each layer's slice at its plan width, as fqcompile serves it."""
    loaded = fqcompile.load(folder)
    return {name: dequantize(m.planes(), m.scale, m.zero, m.layout, bits[name])
            for name, m in loaded.model.named_modules() if name in bits}


def plan_bits(folder, spec) -> dict[str, int]:
    loaded = fqcompile.load(folder)
    plan = resolve(loaded.policy, loaded.manifest, spec)
    return {n: int(b) for names, b in zip(plan.units, plan.bits[0].tolist()) for n in names}


@pytest.mark.parametrize("fmt", gptq_format.FORMATS)
@pytest.mark.parametrize("bits", [4, 8])
def test_a_zero_exact_rung_exports_exactly(zero_exact, tmp_path, fmt, bits):
    record = export_gptq(zero_exact, tmp_path / "g", f"static:{bits}", fmt, progress=False)
    assert record["exact"] == {"max_relative_difference": 0.0, "identical": True}
    config = gptq_format.read_config(tmp_path / "g")
    assert config == json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]
    assert (config["bits"], config["group_size"], config["sym"], config["desc_act"], config["checkpoint_format"]) == \
        (bits, 32, False, False, fmt)
    expected = slices(zero_exact, {n: bits for n in fqcompile.load(zero_exact).manifest["modules"]})
    exported = gptq_format.read(tmp_path / "g")
    assert exported.keys() == expected.keys()
    for name, weight in exported.items():
        assert torch.equal(weight, expected[name]), name


def test_mislabelled_zero_points_are_off_by_one_step(zero_exact, tmp_path):
    """The two conventions differ by one stored unit: a v1 export read as v2 is one scale step off
    (and v2 read as v1 one step the other way), except where a zero of 0 made v1 borrow from the
    next field, which a per-field reader misreads by more. That is why the label must be right."""
    export_gptq(zero_exact, tmp_path / "v1", "static:4", "gptq", progress=False)
    export_gptq(zero_exact, tmp_path / "v2", "static:4", "gptq_v2", progress=False)
    name = "model.layers.0.mlp.down_proj"  # in 196: padded codes; short last groups, some with zero 0
    layers = {v: gptq_format.read_tensors(tmp_path / v)[0][name] for v in ("v1", "v2")}
    assert torch.equal(layers["v1"]["qweight"], layers["v2"]["qweight"])
    zero = fqcompile.load(zero_exact).model.get_submodule(name).zero.long()  # [N, G]: 4 bits, the lowest rung's
    stored = gptq_format.unpack(layers["v2"]["qzeros"], 4, 1)[:, :zero.shape[0]]
    assert torch.equal(stored.T, zero)  # v2 stores the zero points as they are
    g = layers["v1"]["g_idx"].long()
    step = layers["v1"]["scales"].float()[g].T
    right = gptq_format.dequantize(layers["v1"], 4, "gptq")
    borrow, carry = ripples(zero, -1), ripples(zero, +1)  # v1 stores zero - 1; read as v1, + 1
    assert 0 < int(borrow.sum()) < borrow.numel() // 4
    wrong = gptq_format.dequantize(layers["v1"], 4, "gptq_v2") - right
    assert torch.allclose(wrong[~borrow[:, g]], step[~borrow[:, g]], rtol=1e-6, atol=0)
    assert (wrong[borrow[:, g]].abs() > 1.5 * step[borrow[:, g]]).all()
    wrong = gptq_format.dequantize(layers["v2"], 4, "gptq") - right
    assert torch.allclose(wrong[~carry[:, g]], -step[~carry[:, g]], rtol=1e-6, atol=0)


def ripples(zero: torch.Tensor, sign: int) -> torch.Tensor:
    """[N, G]: the 4-bit fields (8 per word, along N) that adding `sign` (+1 or -1) to every field
    of the word at once does not simply shift by one: those that over- or underflow, and those
    a carry or borrow from the field below reaches."""
    out = torch.zeros_like(zero, dtype=torch.bool)
    ripple = torch.zeros_like(zero[0], dtype=torch.bool)
    for i in range(zero.shape[0]):
        ripple = ripple & (i % 8 != 0)  # a new word
        value = zero[i] + sign + sign * ripple.long()
        out[i] = ripple | (value < 0) | (value > 15)
        ripple = (value < 0) | (value > 15)
    return out


def test_bytes_are_what_gptq_expects_and_nothing_is_duplicated(zero_exact, tmp_path):
    record = export_gptq(zero_exact, tmp_path / "g", "static:4", "gptq_v2", progress=False)
    manifest = fqcompile.load(zero_exact).manifest
    expected, weights = 0, 0
    for shape in (m["shape"] for m in manifest["modules"].values()):
        n, k = shape
        groups = -(-k // 32)
        expected += -(-k // 8) * 4 * n + groups * n * 2 + groups * -(-n // 8) * 4  # codes, fp16 scales, zeros
        weights += n * k
    assert record["quantized_bytes"] == expected
    assert record["bits_per_weight"] == pytest.approx(8 * expected / weights)
    with safe_open(str(tmp_path / "g" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    quantized = set(manifest["modules"])
    assert not {f"{n}.weight" for n in quantized} & keys  # no float copy of a quantized layer
    dense = {k for k in keys if k.rpartition(".")[0] not in quantized}
    with safe_open(str(zero_exact / "dense.safetensors"), "pt") as f:
        assert dense == set(f.keys())
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md", RECORD):
        assert (tmp_path / "g" / name).is_file(), name


def test_static_mixed_plan_writes_dynamic_overrides(zero_exact, tmp_path):
    record = export_gptq(zero_exact, tmp_path / "g", "static-mixed:6", "gptq_v2", progress=False)
    wanted = plan_bits(zero_exact, "static-mixed:6")
    assert len(set(wanted.values())) == 2, "the calibrated plan should mix 4 and 8 bits"
    config = gptq_format.read_config(tmp_path / "g")
    assert config["dynamic"] and all(k.startswith("+:") for k in config["dynamic"])
    exported = {name: gptq_format.layer_bits(config, name) for name in wanted}
    for name, bits in exported.items():
        parent, _, attr = name.rpartition(".")
        group = next((g for g in FUSED if attr in g), (attr,))
        assert bits == max(wanted[f"{parent}.{p}"] for p in group), name  # fused parts share the widest
        fused = {"q_proj": "qkv_proj", "gate_proj": "gate_up_proj"}.get(attr)
        if fused:  # vLLM asks for the fused layer by its own name
            assert gptq_format.layer_bits(config, f"{parent}.{fused}") == bits, name
    assert set(record["raised_to_fused_width"]) == {n for n in wanted if exported[n] != wanted[n]}
    assert record["exact"]["identical"]
    read = gptq_format.read(tmp_path / "g")
    for name, weight in slices(zero_exact, exported).items():
        assert torch.equal(read[name], weight), name
    assert json.loads((tmp_path / "g" / RECORD).read_text())["layers_at"] == {
        str(b): sum(1 for v in exported.values() if v == b) for b in sorted(set(exported.values()))}


def test_rungs_gptq_does_not_pack_are_widened_exactly(tiny_dir, tmp_path):
    ckpt = fqcompile.export(str(tiny_dir), tmp_path / "c", ladder=(3, 6, 8), group_size=32, grid="zero-exact",
                            progress=False)
    for bits in (3, 6):
        record = export_gptq(ckpt, tmp_path / f"g{bits}", f"static:{bits}", progress=False)
        assert record["widened"] == {str(bits): stored_width(bits)} and record["exact"]["identical"]
        assert gptq_format.read_config(tmp_path / f"g{bits}")["bits"] == stored_width(bits)
        assert any(f"at {bits} bits are stored as {stored_width(bits)}-bit" in n for n in record["notes"])


def test_export_loads_as_a_plain_model_with_fqcompiles_perplexity(zero_exact, austen, tmp_path):
    record = export_gptq(zero_exact, tmp_path / "g", "static-mixed:6", "gptq", dataset=str(austen / "emma.txt"),
                         samples=2, seq_len=64, progress=False)
    q = record["quality"]
    assert q["tokens"] == 2 * 63
    assert q["perplexity"] == pytest.approx(q["fqcompile_perplexity"], rel=1e-4)
    assert q["kl_vs_fqcompile"] < 1e-6
    assert "perplexity" in (tmp_path / "g" / "README.md").read_text()
    model = dense_model(tmp_path / "g")  # what a GPTQ loader dequantizes, without one
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight, gptq_format.read(tmp_path / "g")[
        "model.layers.1.mlp.up_proj"])


def test_lowest_rung_grid_exports_only_its_lowest_rung(tiny_ckpt, tmp_path):
    assert export_gptq(tiny_ckpt, tmp_path / "g4", "static:4", progress=False)["exact"]["identical"]
    with pytest.raises(FqError, match="8-bit slice of a lowest-rung checkpoint has half-integer zero points.*"
                                      "`grid='zero-exact'`"):
        export_gptq(tiny_ckpt, tmp_path / "g8", "static:8", progress=False)
    assert not (tmp_path / "g8").exists()


def test_refusals(zero_exact, tiny_ckpt, tmp_path):
    with pytest.raises(FqError, match=r"precision 6 is not in the ladder \[4, 8\]"):
        export_gptq(zero_exact, tmp_path / "a", "static:6", progress=False)
    with pytest.raises(FqError, match="switches per token; a GPTQ checkpoint holds one static plan"):
        export_gptq(zero_exact, tmp_path / "b", "dynamic", progress=False)
    with pytest.raises(FqError, match="needs a calibrated checkpoint"):
        export_gptq(tiny_ckpt, tmp_path / "c", "static-mixed:6", progress=False)
    with pytest.raises(FqError, match="unknown `checkpoint_format` 'gptq_v3'"):
        export_gptq(zero_exact, tmp_path / "d", "static:4", "gptq_v3", progress=False)
    with pytest.raises(FqError, match="not an fqcompile checkpoint"):
        export_gptq(tmp_path, tmp_path / "e", "static:4", progress=False)
    export_gptq(zero_exact, tmp_path / "f", "static:4", progress=False)
    with pytest.raises(FqError, match="already exists"):
        export_gptq(zero_exact, tmp_path / "f", "static:8", progress=False)
    assert gptq_format.read_config(tmp_path / "f")["bits"] == 4  # untouched
    export_gptq(zero_exact, tmp_path / "f", "static:8", force=True, progress=False)
    assert gptq_format.read_config(tmp_path / "f")["bits"] == 8
    assert not any((tmp_path / n).exists() for n in "abcde")


def test_an_architecture_gptq_loaders_name_differently_is_refused(smol_dir, tmp_path):
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                           num_attention_heads=4, max_position_embeddings=64)
    GPTNeoXForCausalLM(config).save_pretrained(tmp_path / "neox")
    AutoTokenizer.from_pretrained(smol_dir).save_pretrained(tmp_path / "neox")
    ckpt = fqcompile.export(str(tmp_path / "neox"), tmp_path / "c", group_size=32, grid="zero-exact", progress=False)
    with pytest.raises(FqError, match="GPTQ export supports LlamaForCausalLM.*not GPTNeoXForCausalLM"):
        export_gptq(ckpt, tmp_path / "g", "static:4", progress=False)


def test_command_line(zero_exact, tiny_ckpt, tmp_path):
    from typer.testing import CliRunner

    from fqcompile.cli import app

    def run(*args):
        return CliRunner().invoke(app, ["export-gptq", *map(str, args)], env={"FQCOMPILE_DEBUG": ""})

    result = run(zero_exact, "--policy", "static-mixed:6", "--out", tmp_path / "g")
    assert result.exit_code == 0, result.stderr
    assert "static-mixed:6 (" in result.stdout and "exact: every weight equals the nested slice" in result.stdout
    assert "note: asymmetric groups (sym false)" in result.stderr
    for args, message in (
        ((zero_exact, "--policy", "static:8", "--out", tmp_path / "g"), "already exists (use --force to overwrite it)"),
        ((tiny_ckpt, "--policy", "static:8", "--out", tmp_path / "h"), "re-export the model with --grid zero-exact"),
        ((zero_exact, "--policy", "static:4", "--out", tmp_path / "h", "--checkpoint-format", "v3"),
         "unknown --checkpoint-format 'v3'"),
    ):
        result = run(*args)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "h").exists()
