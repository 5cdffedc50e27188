"""The error-estimate signal: its estimator on the built-in model's real inputs, its thresholds,
and the same per-token decisions in every engine."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import fqcompile
from fqcompile import sources
from fqcompile.calibration import estimate
from fqcompile.calibration import policy as pol
from fqcompile.calibration import sensitivity as m
from fqcompile.calibration.data import load_samples
from fqcompile.calibrator import calibrate
from fqcompile.controller import Controller, resolve
from fqcompile.errors import FqError
from fqcompile.evaluation import evaluate_policies, evaluate_served, evaluate_served_parallel
from fqcompile.generation import decoder
from fqcompile.loader import dense_weights
from fqcompile.sources import quantizable


@pytest.fixture(scope="module")
def smol_measured(tmp_path_factory, austen):
    """The built-in model, projection units (the default), [4, 8] RTN slices: measured on 4 x 64
    `calib` tokens, inputs recorded on those and on 4 x 96 held-out (`eval`) tokens."""
    model, tok, _ = sources.load(sources.BUILTIN_NAME)
    units = m.units_of(model, [n for n, _ in quantizable(model)], "projection")
    slice_of = m.rtn_slices(model, 128, (4, 8))
    calib = load_samples(str(austen), tok, split="calib", seq_len=64, max_samples=4, model=model)
    held = load_samples(str(austen), tok, split="eval", seq_len=96, max_samples=4, model=model)
    folder = tmp_path_factory.mktemp("smol-measure")
    results = m.measure(model, calib, units, (4, 8), slice_of, folder, batch_size=4, progress=False)
    fit_inputs = estimate.record(model, [calib], units, (4, 8), slice_of, folder)
    held_folder = tmp_path_factory.mktemp("smol-held")
    held_inputs = estimate.record(model, [held], units, (4, 8), slice_of, held_folder)
    shares = torch.tensor([sum(model.get_submodule(n).weight.numel() for n in u.modules) for u in units],
                          dtype=torch.float64)
    return results, fit_inputs, held_inputs, shares / shares.sum()


def test_recorded_energy_is_the_true_error_of_each_unit(tiny_dir, austen, tmp_path):
    """estimate.record's energy equals ||(W8 - W4) x||^2 / weights summed over a unit's layers, in float64."""
    model, tok, _ = sources.load(str(tiny_dir))
    units = m.units_of(model, [n for n, _ in quantizable(model)], "block")
    slice_of = m.rtn_slices(model, 32, (4, 8))
    batch = load_samples(str(austen / "emma.txt"), tok, split="calib", seq_len=24, max_samples=2, model=model)
    rec = estimate.record(model, [batch], units, (4, 8), slice_of, tmp_path)
    inputs = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda mod, a, n=n: inputs.__setitem__(n, a[0]))
             for u in units for n in u.modules]
    with torch.no_grad():
        model(batch, use_cache=False)
    for h in hooks:
        h.remove()
    for u, unit in enumerate(units):
        energy = sum(((inputs[n][:, :-1].double() @ (slice_of(n, 8) - slice_of(n, 4)).double().T) ** 2).sum(-1)
                     for n in unit.modules)
        size = sum(model.get_submodule(n).weight.numel() for n in unit.modules)
        assert torch.allclose(rec["energy"][u, 0].double(), energy / size, rtol=1e-4)
        ms = inputs[unit.modules[0]][:, :-1].double().pow(2).mean(-1)
        assert torch.allclose(rec["ms"][u].double(), ms, rtol=1e-5)
    assert (rec["energy"] > 0).all()


@pytest.mark.slow
def test_estimator_predicts_the_true_error_on_held_out_text(smol_measured):
    """Fitted on calibration inputs, a + c ms(x) tracks each projection's true 4-bit error on held-out text."""
    _, fit_inputs, held, _ = smol_measured
    a, c, r2_fit = estimate.fit_estimators(fit_inputs["ms"], fit_inputs["energy"])
    true = held["energy"][:, 0, :, 1:].flatten(1).double()  # [units, tokens]; position 0 is never decided
    guess = a[:, :1] + c[:, :1] * held["ms"][:, :, 1:].flatten(1).double()
    r2 = 1 - (true - guess).pow(2).sum(1) / (true - true.mean(1, keepdim=True)).pow(2).sum(1)
    assert r2.median() > 0.5 and r2_fit.median() > 0.5
    assert ((guess.mean(1) / true.mean(1) - 1).abs() < 0.25).float().mean() > 0.9  # the level, unit by unit
    # better than a constant: the estimate explains most of the per-token variation for most units
    assert (r2 > 0.3).float().mean() > 0.7


@pytest.mark.slow
def test_thresholds_hit_the_target_bits_on_held_out_text(smol_measured):
    results, fit_inputs, held, shares = smol_measured
    ladder = (4, 8)
    est = estimate.fit(fit_inputs, results, ladder, [], 0.0)
    base = results["baseline"][:, 1:].double().mean().reshape(1)
    one = torch.ones(1, dtype=torch.float64)
    for target in (5.0, 6.0, 7.0):
        lam = pol.fit(*estimate.table(est, base, one), shares, ladder, target_bits=target)
        rules = estimate.rules(est, lam, shares, ladder)
        chosen = torch.tensor([[estimate.decide(rules["edges"][0][u], rules["bits"][0][u], float(x))
                                for x in held["ms"][u, :, 1:].flatten()] for u in range(len(shares))],
                              dtype=torch.float64)
        bits = float((chosen.mean(1) * shares).sum())
        assert abs(bits - target) <= 0.1, (target, bits)


def test_rules_are_the_per_token_argmin():
    """The ms intervals of a rule give, for any input, the precision of least cost (3-rung ladders too)."""
    gen = torch.Generator().manual_seed(0)
    for ladder in ((4, 8), (4, 6, 8), (3, 4, 6, 8)):
        r = len(ladder) - 1
        est = {"a": torch.rand(3, r, generator=gen).mul(1e-3).tolist(),
               "c": torch.rand(3, r, generator=gen).mul(1e-3).sort(descending=True).values.tolist(),
               "kl_per_energy": torch.rand(2, 3, r, generator=gen).mul(50).tolist()}
        shares = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
        for lam in (1e-6, 1e-4, 1e-3):
            rules = estimate.rules(est, lam, shares, ladder)
            for k in range(2):
                for u in range(3):
                    edges = rules["edges"][k][u]
                    assert edges == sorted(edges) and len(rules["bits"][k][u]) == len(edges) + 1
                    for x in torch.rand(200, generator=gen).mul(20).tolist():
                        cost = [est["kl_per_energy"][k][u][j] * (est["a"][u][j] + est["c"][u][j] * x)
                                + lam * b * shares[u] for j, b in enumerate(ladder[:-1])] + [lam * ladder[-1] * shares[u]]
                        best = min(range(len(cost)), key=cost.__getitem__)
                        got = ladder.index(estimate.decide(edges, rules["bits"][k][u], x))
                        assert cost[got] <= cost[best] + 1e-12


def test_estimators_are_never_negative():
    ms = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    rising = torch.tensor([[[0.0, 0.0, 1.0, 2.0]]])  # least squares would give a negative intercept
    falling = torch.tensor([[[4.0, 3.0, 2.0, 1.0]]])  # and here a negative slope
    for energy in (rising, falling):
        a, c, _ = estimate.fit_estimators(ms, energy)
        assert (a >= 0).all() and (c >= 0).all()
        assert (a + c * torch.tensor([0.0, 100.0]) >= 0).all()


@pytest.fixture(scope="module")
def varied_dir(tmp_path_factory, tiny_dir):
    """The tiny model with its norm weights spread over [0.2, 2]: inputs after a norm vary in
    mean square from token to token, as in trained models (at init they are all 1)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=gen) * 1.8 + 0.2)
    out = tmp_path_factory.mktemp("varied") / "model"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(out)
    return out


def _estimate_ckpt(work, model_dir, austen, unit, signal="estimate"):
    calibrate(str(model_dir), work / "cal", dataset=str(austen / "emma.txt"), samples=6, eval_samples=4, seq_len=48,
              group_size=32, batch_size=3, unit=unit, signal=signal, buckets=3, progress=False)
    return fqcompile.export(str(model_dir), work / "ck", ladder=(4, 8), group_size=32, calib=work / "cal",
                            progress=False), work / "cal"


@pytest.fixture(scope="module")
def linear_ckpt(tmp_path_factory, tiny_dir, austen):
    """The tiny model calibrated per linear layer with the error-estimate signal, exported with it."""
    return _estimate_ckpt(tmp_path_factory.mktemp("estimate-linear"), tiny_dir, austen, "linear")


@pytest.fixture(scope="module")
def block_ckpt(tmp_path_factory, varied_dir, austen):
    """The varied-norm tiny model calibrated per block with the error-estimate signal."""
    return _estimate_ckpt(tmp_path_factory.mktemp("estimate-block"), varied_dir, austen, "block")


@pytest.fixture(scope="module")
def projection_ckpt(tmp_path_factory, varied_dir, austen):
    """The varied-norm tiny model calibrated per projection (q/k/v, o, gate/up, down)."""
    return _estimate_ckpt(tmp_path_factory.mktemp("estimate-projection"), varied_dir, austen, "projection")


def test_projection_units_are_the_linears_reading_one_input(tiny_dir):
    model = sources.load(str(tiny_dir))[0]
    units = m.units_of(model, [n for n, _ in quantizable(model)], "projection")
    names = [tuple(n.rsplit(".", 1)[1] for n in u.modules) for u in units]
    assert names == [("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)] * 2
    assert [u.block for u in units] == [0] * 4 + [1] * 4
    # one label per unit, in calibration and in `generate -v` alike: no two alike
    assert [u.name for u in units[:4]] == [
        "model.layers.0.self_attn.q_proj+k_proj+v_proj", "model.layers.0.self_attn.o_proj",
        "model.layers.0.mlp.gate_proj+up_proj", "model.layers.0.mlp.down_proj"]
    assert pol.unit_label([n for u in units[:4] for n in u.modules]) == "model.layers.0"  # a block


def test_estimate_policy_fields(linear_ckpt):
    folder, cal = linear_ckpt
    policy = json.loads((cal / "policy.json").read_text())
    assert policy["signal"]["kind"] == "error-estimate" and policy["bucket_edges"] == [] and "plans" not in policy
    units = len(policy["units"])
    assert len(policy["rules"]["edges"]) == 1 and len(policy["rules"]["edges"][0]) == units == 14
    assert sum(bool(e) for e in policy["rules"]["edges"][0]) > 0  # some units switch on their input
    assert len(policy["estimate"]["input_quantiles"][0][0]) == estimate.QUANTILES
    table = json.loads((cal / "table.json").read_text())
    assert all(abs(r["measured_bits"] - r["avg_bits"]) < 1.0 for r in table["validation"])
    assert (cal / "estimate.png").is_file() and "R² quartiles" in (cal / "report.md").read_text()


def _traces(loaded, spec, engines, ids, trace=True):
    """Per engine ("hf", "slim" per-op loop, "stack"): the gates' decisions and the controller's
    stats over the tokens `ids` [1, T], fed one at a time after a one-token prompt."""
    out = {}
    for engine in engines:
        dec = decoder(loaded)
        dec.use_stack = engine == "stack"
        controller = Controller(loaded.model, loaded.manifest, resolve(loaded.policy, loaded.manifest, spec))
        controller.trace = [] if trace else None
        with torch.inference_mode():
            if engine == "hf":
                past = None
                for t in range(ids.shape[1]):
                    past = loaded.model(ids[:, t:t + 1], past_key_values=past, use_cache=True).past_key_values
            else:
                controller.attach(dec)
                dec.setup_cache(1, ids.shape[1])
                for t in range(ids.shape[1]):
                    dec(ids[:, t:t + 1], torch.tensor([[t]]), t)
        controller.close()
        out[engine] = controller.trace, controller.stats(), bool(dec._ruled)
    decoder(loaded).use_stack = True
    return out


def _same_decisions(runs):
    (first, stats, _), *others = runs.values()
    assert len(first) > 0 and {b for _, _, bits in first for b in bits} == {4, 8}  # decisions vary
    for trace, other_stats, _ in others:
        assert [t[0] for t in trace] == [t[0] for t in first]
        for (_, ms_a, bits_a), (_, ms_b, bits_b) in zip(first, trace):
            assert ms_a == pytest.approx(ms_b, rel=1e-4)
            assert bits_a == bits_b
        assert other_stats["avg_bits_read"] == pytest.approx(stats["avg_bits_read"])


def _text(loaded, austen, tokens=40):
    return load_samples(str(austen / "emma.txt"), loaded.tokenizer, split="eval", seq_len=tokens, max_samples=1)


def test_every_engine_makes_the_same_decisions_per_block(block_ckpt, austen):
    """The HF model (gates in FlexLinear.forward), the slim per-op loop (gates before its fused
    calls) and the C++ stack (rules run in C++) decide every block alike, token by token."""
    loaded = fqcompile.load(block_ckpt[0])
    ids = _text(loaded, austen)
    for spec in ("dynamic:5.5", "dynamic:6.5"):
        runs = _traces(loaded, spec, ("hf", "slim", "stack"), ids)
        _same_decisions(runs)
        assert runs["stack"][2] and not runs["slim"][2]  # the stack ran the rules itself
        assert 4 < runs["stack"][1]["avg_bits_read"] < 9


def test_every_engine_makes_the_same_decisions_per_projection(projection_ckpt, austen):
    """Each projection decides on its own input: in the stack, every slot runs its own rule."""
    loaded = fqcompile.load(projection_ckpt[0])
    ids = _text(loaded, austen)
    runs = _traces(loaded, "dynamic:6", ("hf", "slim", "stack"), ids)
    _same_decisions(runs)
    assert runs["stack"][2]
    assert len({u for u, _, _ in runs["stack"][0]}) > 2  # several projections switch
    untraced = _traces(loaded, "dynamic:6", ("stack",), ids, trace=False)["stack"][1]  # counted in tensors
    traced = runs["stack"][1]
    assert untraced["avg_bits_read"] == pytest.approx(traced["avg_bits_read"]) and untraced["share"] == pytest.approx(
        traced["share"])


def test_every_engine_makes_the_same_decisions_per_linear(linear_ckpt, austen):
    """Per-linear gates: q, k and v decide apart on their shared input (the stack leaves such slots
    to the per-op loop)."""
    loaded = fqcompile.load(linear_ckpt[0])
    runs = _traces(loaded, "dynamic:6", ("hf", "slim", "stack"), _text(loaded, austen))
    _same_decisions(runs)
    assert not runs["stack"][2]


def test_served_evaluation_runs_the_rules(linear_ckpt, tiny_dir, austen):
    loaded = fqcompile.load(linear_ckpt[0], quantized_head=True)  # as `eval` serves by default
    ref = sources.load(str(tiny_dir))[0]
    data = load_samples(str(austen / "emma.txt"), loaded.tokenizer, split="eval", seq_len=24, max_samples=2)
    rows = evaluate_policies(loaded, data, ["static:8", "static:4", "dynamic:5", "dynamic:7"], reference=ref,
                             progress=False)
    low, high = rows["dynamic:5"], rows["dynamic:7"]
    assert rows["static:8"]["kl"] < high["kl"] < low["kl"] < rows["static:4"]["kl"] * 1.01
    assert low["avg_bits_read"] < high["avg_bits_read"]
    assert 0 < low["share"]["8"] < high["share"]["8"] < 1


def test_served_evaluation_in_passes_equals_step_by_step(block_ckpt, varied_dir, austen, tmp_path):
    """What `eval --policy` and pareto.py run (evaluate_policies) gives evaluate_served's numbers
    one row at a time: error estimates alone and a static-mixed plan in one teacher-forced pass
    (evaluate_served_parallel), a plan with entropy buckets step by step with all rows a step."""
    both, _ = _estimate_ckpt(tmp_path, varied_dir, austen, "block", signal="both")
    ref = sources.load(str(varied_dir))[0]
    for folder, spec, one_pass in ((block_ckpt[0], "dynamic:5.5", True), (both, "dynamic:5.5", False),
                                   (both, "static-mixed:6", True)):
        loaded = fqcompile.load(folder)
        data = load_samples(str(austen / "emma.txt"), loaded.tokenizer, split="eval", seq_len=40, max_samples=3)
        with dense_weights(loaded.model):
            controller = Controller(loaded.model, loaded.manifest, resolve(loaded.policy, loaded.manifest, spec))
            steps = evaluate_served(loaded.model, controller, data, reference=ref, batch_size=1, progress=False)
            if one_pass:
                parallel = evaluate_served_parallel(loaded.model, controller, data, reference=ref, progress=False)
            else:
                with pytest.raises(FqError, match="step by step"):
                    evaluate_served_parallel(loaded.model, controller, data, reference=ref, progress=False)
            controller.close()
        served = evaluate_policies(loaded, data, [spec], reference=ref, batch_size=2, progress=False)
        for row in [served[steps["policy"]]] + ([parallel] if one_pass else []):
            assert row["kl"] == pytest.approx(steps["kl"], rel=1e-4)
            assert row["perplexity"] == pytest.approx(steps["perplexity"], rel=1e-5)
            assert row["avg_bits_read"] == steps["avg_bits_read"] and row["share"] == steps["share"]
            assert row["decode_tokens"] == steps["decode_tokens"] == 3 * 38
            assert 0 < row["share"]["4"] < 1
