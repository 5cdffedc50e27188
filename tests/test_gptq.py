"""Nested GPTQ: error reduction on held-out inputs, agreement with a float64 textbook GPTQ,
act-order bookkeeping, block-by-block export, determinism, and the GPTQ checkpoint reader."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fqcompile.calibration import gptq
from fqcompile.formats import gptq_format
from fqcompile.formats.nested import GRIDS, ZERO_EXACT, Layout, decode_codes, group_grid, quantize_rtn


def layer_data(seed=0, n=96, k=200, rows=3000):
    """A random linear layer and correlated inputs with a few loud channels (as in real LLMs)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5
    loud = torch.ones(k)
    loud[torch.randperm(k, generator=g)[:6]] = 8.0

    def inputs(count):
        return (torch.randn(count, k, generator=g) @ mix + 0.2 * torch.randn(count, k, generator=g)) * loud

    w = torch.randn(n, k, generator=g) * 0.04
    return w, inputs(rows), inputs(rows)


def layout_of(w, group_size, ladder, grid=ZERO_EXACT):
    return Layout(*w.shape, group_size, tuple(ladder), grid)


def dense(codes, scale, zero, group_size, ladder, bits, grid=ZERO_EXACT):
    return decode_codes(codes, scale, zero, Layout(*codes.shape, group_size, tuple(ladder), grid), bits)


def output_error(x, w, w_hat):
    return torch.linalg.norm(x.double() @ (w - w_hat).double().T).item()


@pytest.mark.parametrize("ladder", [(4,), (3,), (4, 8), (3, 4, 6, 8)])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("grid", list(GRIDS))
def test_gptq_beats_rtn_on_held_out_inputs_at_every_rung(ladder, act_order, grid):
    w, x_cal, x_test = layer_data()
    group_size = 64  # 200 = 3 x 64 + 8: a short last group
    layout = layout_of(w, group_size, ladder, grid)
    q, weights, _ = gptq.balance(w, x_cal.T @ x_cal, layout, gptq.GPTQConfig(act_order=act_order))
    rtn = quantize_rtn(w, group_size, ladder, grid)
    for b in ladder:
        ours = output_error(x_test, w, decode_codes(q.codes, q.scale, q.zero, layout, b))
        plain = output_error(x_test, w, decode_codes(*rtn, layout, b))
        # one rung alone is plain GPTQ: a large gain; nested, the lowest rung gains most and the
        # others are held within the upper budget (in-sample), so every rung must still gain.
        # Known limit (docs/quality.md): zero-exact [3, 4, 6, 8] without act-order (not the
        # default) keeps its rungs within budget in-sample but lands within 5% of RTN on held-out inputs.
        loose = grid == ZERO_EXACT and not act_order and len(ladder) == 4
        assert ours < (0.9 if len(ladder) == 1 else 1.05 if loose else 1.0) * plain, (b, ours, plain, weights)


def textbook_gptq(w, h, group_size, bits, damp):
    """GPTQ as first described (OBQ updates with the explicit inverse), float64, no blocking."""
    w, h = w.double().clone(), h.double().clone()
    k = w.shape[1]
    h += damp * h.diagonal().mean() * torch.eye(k, dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    codes = torch.empty(w.shape, dtype=torch.uint8)
    for j in range(k):
        if j % group_size == 0:
            part = w[:, j : j + group_size].float()
            scale, zero = group_grid(part.amin(1), part.amax(1), bits)
        s, z = scale.double(), zero.double()
        q = torch.floor(w[:, j] / s + z + 0.5).clamp(0, 2**bits - 1)
        codes[:, j] = q.to(torch.uint8)
        err = (w[:, j] - (q - z) * s) / hinv[j, j]
        w[:, j:] -= err[:, None] * hinv[j, j:][None, :]
        hinv -= hinv[:, j : j + 1] @ hinv[j : j + 1, :] / hinv[j, j]  # condition on column j being fixed
    return codes


def test_one_rung_is_textbook_gptq():
    w, x_cal, x_test = layer_data(seed=3, n=48, k=160)
    h = x_cal.T @ x_cal
    q = gptq.quantize(w, h, layout_of(w, 64, (4,)), gptq.GPTQConfig(block_size=32, act_order=False))
    oracle = textbook_gptq(w, h, 64, 4, 0.01)
    differ = (q.codes != oracle).float().mean().item()
    assert differ < 0.02, differ  # float32 vs float64 ties only


def test_act_order_visits_by_decreasing_hessian_diagonal_and_keeps_column_order():
    w, x_cal, x_test = layer_data(seed=5)
    h = x_cal.T @ x_cal
    q = gptq.quantize(w, h, layout_of(w, 64, (4, 8)), gptq.GPTQConfig(act_order=True))
    assert torch.equal(q.order.long(), torch.argsort(h.diagonal(), descending=True, stable=True))
    # codes are stored in the original column order: every column of the 8-bit slice stays
    # close to its own weight column (a permuted store would be off by the weights' spread)
    w8 = dense(q.codes, q.scale, q.zero, 64, (4, 8), 8)
    per_column = (w8 - w).abs().amax(0) / w.abs().amax(0)
    assert per_column.max() < 0.5


def test_degenerate_inputs_are_handled():
    w, x_cal, _ = layer_data(seed=7, n=16, k=64)
    x_cal[:, :5] = 0.0  # dead input channels
    q = gptq.quantize(w, x_cal.T @ x_cal, layout_of(w, 32, (4, 8)))
    assert torch.isfinite(dense(q.codes, q.scale, q.zero, 32, (4, 8), 8)).all()
    with pytest.raises(Exception, match="NaN or Inf"):
        gptq.quantize(w, torch.full((64, 64), float("nan")), layout_of(w, 32, (4, 8)))


# ---- export --method gptq (tiny random Llama, block by block) ----

def gptq_export(tiny_dir, out, **kw):
    import fqcompile

    settings = dict(ladder=(4, 8), group_size=32, progress=False, method="gptq", samples=8, seq_len=64)
    return fqcompile.export(str(tiny_dir), out, **{**settings, **kw})


def test_gptq_export_is_deterministic_and_logs_every_layer(tiny_dir, austen, tmp_path):
    a = gptq_export(tiny_dir, tmp_path / "a", dataset=str(austen))
    b = gptq_export(tiny_dir, tmp_path / "b", dataset=str(austen))
    files_a = json.loads((a / "fqcompile.json").read_text())["files"]
    files_b = json.loads((b / "fqcompile.json").read_text())["files"]
    log = json.loads((a / "gptq-log.json").read_text())
    files_a.pop("gptq-log.json"), files_b.pop("gptq-log.json")  # holds the wall time
    assert files_a == files_b
    manifest = json.loads((a / "fqcompile.json").read_text())
    assert manifest["quantizer"]["method"] == "gptq"
    assert set(log["layers"]) == set(manifest["modules"])
    assert log["peak_rss_mib"] > 0
    for entry in log["layers"].values():
        assert set(entry["loss"]) == {"4", "8"}
    # in-sample output error, summed over the model: GPTQ below RTN at both rungs
    for b in ("4", "8"):
        assert sum(e["loss"][b]["gptq"] for e in log["layers"].values()) < \
            sum(e["loss"][b]["rtn"] for e in log["layers"].values())


def test_gptq_checkpoint_loads_and_stays_close_to_the_model(tiny_dir, austen, tmp_path):
    import fqcompile
    from fqcompile import sources
    from fqcompile.calibration.data import load_samples

    out = gptq_export(tiny_dir, tmp_path / "g", dataset=str(austen))
    rtn = fqcompile.export(str(tiny_dir), tmp_path / "r", ladder=(4, 8), group_size=32, progress=False)
    ref, tok, _ = sources.load(str(tiny_dir))
    data = load_samples(str(austen), tok, split="eval", seq_len=64, max_samples=8)
    kl = {}
    for name, folder in (("gptq", out), ("rtn", rtn)):
        loaded = fqcompile.load(folder)
        result = fqcompile.evaluate(loaded.model, data, precisions=(4, 8), reference=ref, progress=False)
        kl[name] = {b: result[b]["kl"] for b in (4, 8)}
    assert kl["gptq"][4] < kl["rtn"][4]
    assert kl["gptq"][8] < 10 * kl["rtn"][8] and kl["gptq"][8] < 0.05 * kl["gptq"][4]


def test_act_order_is_stored_and_matches_the_layer_inputs(tiny_dir, austen, tmp_path):
    """The stored visiting order of the first layer is the order its inputs' Hessian dictates."""
    from fqcompile import sources
    from fqcompile.calibration.data import load_samples

    out = gptq_export(tiny_dir, tmp_path / "ao", dataset=str(austen), gptq=gptq.GPTQConfig(act_order=True))
    meta = load_file(str(out / "meta.safetensors"))
    model, tok, _ = sources.load(str(tiny_dir))
    data = load_samples(str(austen), tok, split="calib", seq_len=64, max_samples=8)
    first = model.model.layers[0]
    seen = []
    hook = first.self_attn.q_proj.register_forward_pre_hook(lambda _m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(data, use_cache=False)
    hook.remove()
    x = torch.cat(seen)
    expected = torch.argsort((x * x).sum(0), descending=True, stable=True)
    stored = meta["model.layers.0.self_attn.q_proj.order"].long()
    assert sorted(stored.tolist()) == list(range(x.shape[1]))
    assert (stored == expected).float().mean() > 0.9  # float sums may swap near-equal neighbours
    for name in json.loads((out / "fqcompile.json").read_text())["modules"]:
        assert f"{name}.order" in meta


def test_gptq_leaves_every_block_unloaded(tiny_dir, austen):
    """Block-by-block: after the run no block holds real weights (peak memory ~ one block)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from fqcompile.calibration import gptq_blocks
    from fqcompile.calibration.data import load_samples
    from fqcompile.sources import quantizable

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_dir))
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    data = load_samples(str(austen), tok, split="calib", seq_len=32, max_samples=4)
    targets = [n for n, _ in quantizable(model)]
    results, log = gptq_blocks.quantize_model(model, gptq_blocks.weight_files(tiny_dir), targets, data, (4, 8), 32,
                                              ZERO_EXACT, gptq.GPTQConfig(), progress=False)
    assert set(results) == set(targets)
    assert all(p.is_meta for p in model.parameters())


# ---- reading GPTQ checkpoints (GPTQModel's format) ----

@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_gptq_checkpoint_reader(tmp_path, fmt):
    torch.manual_seed(0)
    n, k, bits, group = 16, 96, 4, 32
    codes = torch.randint(0, 16, (k, n))
    zeros = torch.randint(0, 16, (k // group, n))
    zeros[0, :5] = 0  # a zero of 0 borrows from its neighbour in the v1 layout
    scales = (torch.rand(k // group, n) * 0.01 + 0.001).half()
    g_idx = torch.arange(k, dtype=torch.int32) // group
    stored = gptq_format.pack(zeros, bits, 1).long() & 0xFFFFFFFF
    if fmt == "gptq":
        stored = (stored - 0x11111111) & 0xFFFFFFFF
    save_file({"layer.qweight": gptq_format.pack(codes, bits, 0), "layer.qzeros": gptq_format.to_int32(stored),
               "layer.scales": scales, "layer.g_idx": g_idx}, str(tmp_path / "model.safetensors"))
    (tmp_path / "quantize_config.json").write_text(json.dumps({"bits": bits, "checkpoint_format": fmt}))
    w = gptq_format.read(tmp_path)["layer"]
    expected = (scales.float()[g_idx.long()] * (codes - zeros[g_idx.long()]).float()).T
    assert torch.equal(w, expected)
    written = gptq_format.layer_tensors(codes.T, zeros.T, scales.T, bits, group, fmt)  # the writer: same words
    assert torch.equal(written["qzeros"], gptq_format.to_int32(stored))
    assert torch.equal(written["qweight"], gptq_format.pack(codes, bits, 0)) and torch.equal(written["g_idx"], g_idx)


def test_gptq_dynamic_overrides_first_match_wins():
    config = {"bits": 4, "dynamic": {r"layers\.1\.": {"bits": 2}, "-:.*lm_head": {}, r"+:^model\.layers\.1\.": {"bits": 8},
                                     r"^model\.layers\.1\.mlp": {"bits": 2}, r"model\.layers\.2\.mlp\.down_proj$": {}}}
    assert gptq_format.layer_bits(config, "model.layers.0.mlp.up_proj") == 4
    assert gptq_format.layer_bits(config, "model.layers.1.mlp.up_proj") == 8  # the earlier rule wins; the very
    # first one would match inside the name (re.search), but rules match from its start (re.match)
    assert gptq_format.layer_bits(config, "model.layers.2.mlp.down_proj") == 4  # matched, no bits: the base
    assert gptq_format.layer_bits(config, "lm_head") is None  # "-:": left unquantized
    assert gptq_format.layer_bits(config, "model.layers.11.mlp.up_proj") == 4  # re.match anchors at the start only


def test_gptq_checkpoint_reader_refuses_what_it_cannot_read(tmp_path):
    from fqcompile.errors import FqError

    with pytest.raises(FqError, match="no GPTQ quantization config"):
        gptq_format.read(tmp_path)
    (tmp_path / "quantize_config.json").write_text(json.dumps({"bits": 3}))
    with pytest.raises(FqError, match="holds no safetensors files"):
        gptq_format.read(tmp_path)
    codes, zeros = torch.randint(0, 8, (4, 64)), torch.randint(0, 8, (4, 2))
    layer = gptq_format.layer_tensors(codes, zeros, torch.rand(4, 2).half(), 4, 32, "gptq_v2")
    save_file({f"layer.{k}": v for k, v in layer.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(FqError, match="3 bits is not supported"):
        gptq_format.read(tmp_path)
    (tmp_path / "quantize_config.json").write_text(json.dumps({"bits": 8, "checkpoint_format": "gptq_v2"}))
    with pytest.raises(FqError, match="qweight holds fewer than 64 8-bit codes"):  # 4-bit words read as 8-bit
        gptq_format.read(tmp_path)
    with pytest.raises(FqError, match=r"outside \[0, 4\)"):
        gptq_format.layer_tensors(codes, zeros, torch.rand(4, 2).half(), 2, 32, "gptq")
