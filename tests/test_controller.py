"""The precision controller: decisions for crafted entropies, generate integration, served eval."""

import pytest
import torch

import fqcompile
from fqcompile.calibration.data import load_samples
from fqcompile.controller import Controller, Plan, resolve
from fqcompile.errors import FqError
from fqcompile.evaluation import evaluate
from fqcompile.evaluation import evaluate_served
from fqcompile.formats import checkpoint as ckpt
from fqcompile.loader import flex_layers


@pytest.fixture
def loaded(tiny_ckpt):
    return fqcompile.load(tiny_ckpt)


def block_units(manifest):
    return [[n for n in manifest["modules"] if n.startswith(f"model.layers.{i}.")] for i in range(2)]


def crafted(manifest, prefill=8):
    # buckets: H < 1 | 1 <= H < 2 | H >= 2 ; unit 0 drops in the two confident buckets, unit 1 only in the first
    return Plan("crafted", block_units(manifest), [1.0, 2.0], torch.tensor([[4, 4], [4, 8], [8, 8]]), prefill)


def test_decisions_follow_the_policy_for_crafted_entropies(loaded):
    model = loaded.model
    controller = Controller(model, loaded.manifest, crafted(loaded.manifest))
    units = controller.layers
    ids = torch.tensor([[1, 5, 9], [1, 7, 3], [1, 2, 2], [1, 4, 4]])
    model(ids)  # a prompt: prefill precision everywhere
    assert all(layer.precision == 8 for unit in units for layer in unit)
    controller.signal = [0.5, 1.5, 2.5, 1.0]  # 1.0 is an edge: it belongs to the middle bucket
    model(ids[:, -1:])
    for layer in units[0]:
        assert layer.precision.tolist() == [4, 4, 8, 4]
    for layer in units[1]:
        assert layer.precision.tolist() == [4, 8, 8, 8]
    stats = controller.stats(verbose=True)
    assert stats["decode_tokens"] == 4
    assert sum(stats["share"].values()) == pytest.approx(1.0)
    assert stats["share"]["4"] == pytest.approx(4 / 8)  # 3 + 1 of 8 row-unit decisions
    # the signal after a step is each row's entropy of its own next-token distribution
    assert len(controller.signal) == 4 and all(s > 0 for s in controller.signal)
    controller.close()


def test_a_step_sets_only_the_units_whose_bits_change(loaded):
    """Between neighbouring buckets only the changed units are set; a new prompt sets every
    unit again, even ones changed behind the controller's back."""
    from fqcompile import flex_linear

    model = loaded.model
    controller = Controller(model, loaded.manifest, crafted(loaded.manifest))
    units = controller.layers
    ids = torch.tensor([[1, 5, 9]])
    model(ids)
    controller.signal = [2.5]  # bucket 2: [8, 8], as the prefill left them
    before = flex_linear.changes
    model(ids[:, -1:])
    assert flex_linear.changes == before  # nothing to set
    controller.signal = [1.5]  # bucket 1: [4, 8]
    model(ids[:, -1:])
    assert flex_linear.changes == before + 1  # unit 0 only
    assert [layer.precision for unit in units for layer in unit] == [4] * len(units[0]) + [8] * len(units[1])
    fqcompile.set_precision(model, 4)  # someone else switches every layer ...
    model(ids)  # ... and a new prompt puts the prefill precision back on all of them
    assert all(layer.precision == 8 for unit in units for layer in unit)
    controller.close()


def test_smoothed_signal_is_an_ema_of_each_rows_entropy(loaded):
    plan = crafted(loaded.manifest)
    plan.smoothing = 0.75
    controller = Controller(loaded.model, loaded.manifest, plan)
    ids = torch.tensor([[1, 5, 9], [1, 7, 3]])
    logits = loaded.model(ids).logits[:, -1]  # the prompt: the signal starts as the entropy itself
    entropy = -(logits.log_softmax(-1).exp() * logits.log_softmax(-1)).sum(-1)
    assert controller.signal == pytest.approx(entropy.tolist(), rel=1e-4)
    previous = controller.signal
    logits = loaded.model(ids[:, -1:]).logits[:, -1]
    entropy = -(logits.log_softmax(-1).exp() * logits.log_softmax(-1)).sum(-1)
    assert controller.signal == pytest.approx([0.75 * p + 0.25 * h for p, h in zip(previous, entropy.tolist())], rel=1e-4)
    controller.close()


def test_uniform_rows_use_one_precision_and_stats_add_up(loaded):
    controller = Controller(loaded.model, loaded.manifest, crafted(loaded.manifest))
    ids = torch.tensor([[1, 5, 9]])
    loaded.model(ids)
    controller.signal = [0.1]
    loaded.model(ids[:, -1:])
    assert all(layer.precision == 4 for unit in controller.layers for layer in unit)
    stats = controller.stats()
    layouts = ckpt.layouts(loaded.manifest)  # everything at 4 bits for that one token
    read = sum(ckpt.bytes_read(layouts[n], 4) for unit in controller.plan.units for n in unit)
    assert stats["avg_bits_read"] == pytest.approx(8 * read / controller.weights)
    controller.close()


def test_all_top_plan_gives_the_same_greedy_tokens_as_static_top(loaded):
    prompts = "It is a truth universally acknowledged"
    fqcompile.set_precision(loaded.model, 8)
    plain = fqcompile.generate(loaded, prompts, max_new_tokens=12)
    plan = Plan("all-8", block_units(loaded.manifest), [1.0, 2.0], torch.full((3, 2), 8), 8)
    controller = Controller(loaded.model, loaded.manifest, plan)
    controlled = fqcompile.generate(loaded, prompts, max_new_tokens=12, controller=controller)
    assert controlled["text"] == plain["text"]
    assert controlled["controller"]["share"] == {"4": 0.0, "8": 1.0}
    assert controlled["controller"]["decode_tokens"] == 11  # the first new token comes from the prefill
    controller.close()


def test_batch_streaming_and_sampling_keep_working(loaded):
    controller = Controller(loaded.model, loaded.manifest, crafted(loaded.manifest))
    out = fqcompile.generate(loaded, ["Hello", "A much longer prompt than the first"], max_new_tokens=6,
                             temperature=0.9, top_k=20, seed=1, controller=controller)
    assert isinstance(out["text"], list) and len(out["text"]) == 2
    assert out["controller"]["decode_tokens"] == 2 * 5

    class Collect:
        def __init__(self):
            self.ids = []

        def put(self, value):
            self.ids.append(value.flatten())

        def end(self):
            pass

    streamer = Collect()
    single = fqcompile.generate(loaded, "Hello", max_new_tokens=6, streamer=streamer, controller=controller)
    streamed = torch.cat(streamer.ids[1:])  # the first put is the prompt
    assert loaded.tokenizer.decode(streamed, skip_special_tokens=True) == single["text"]
    controller.close()


def test_served_eval_of_a_static_plan_matches_the_teacher_forced_pass(loaded, tiny_dir, austen):
    from fqcompile import sources

    ref = sources.load(str(tiny_dir))[0]
    samples = load_samples(str(austen / "emma.txt"), loaded.tokenizer, split="eval", seq_len=24, max_samples=3)
    fqcompile.set_precision(loaded.model, 4)
    plain = evaluate(loaded.model, samples, precisions=[4], reference=ref, progress=False)[4]
    controller = Controller(loaded.model, loaded.manifest, resolve(loaded.policy, loaded.manifest, "static:4"))
    served = evaluate_served(loaded.model, controller, samples, reference=ref, progress=False)
    controller.close()
    assert served["tokens"] == plain["tokens"]
    assert served["perplexity"] == pytest.approx(plain["perplexity"], rel=1e-4)
    assert served["kl"] == pytest.approx(plain["kl"], rel=1e-3)
    assert served["share"] == {"4": 1.0, "8": 0.0}


def test_policy_specs(loaded):
    with pytest.raises(FqError, match="needs a calibrated checkpoint"):
        resolve(loaded.policy, loaded.manifest, "dynamic")
    with pytest.raises(FqError, match="not in the ladder"):
        resolve(loaded.policy, loaded.manifest, "static:5")
    with pytest.raises(FqError, match="unknown policy"):
        resolve(loaded.policy, loaded.manifest, "fancy")
    plan = resolve(loaded.policy, loaded.manifest, None)  # a static checkpoint: its top precision
    assert plan.label == "static:8" and plan.bits.tolist() == [[8]]
    assert len(flex_layers(loaded.model)) == len(plan.units[0])
