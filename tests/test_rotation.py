"""Offline rotations: the rotated model computes the same function; export --rotate records it,
serves it through both engines, and refuses architectures it does not know."""

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

import fqcompile
from fqcompile.calibration.rotation import hadamard, rotate, rotation
from fqcompile.errors import FqError
from fqcompile import sources


def test_rotations_are_orthogonal_and_seeded():
    assert torch.allclose(hadamard(8) @ hadamard(8).T, torch.eye(8, dtype=torch.float64), atol=1e-12)
    for n in (72, 576, 64):  # 8 x 9, 64 x 9, a power of two
        q = rotation(n, torch.Generator().manual_seed(1))
        assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-10)
        assert torch.equal(q, rotation(n, torch.Generator().manual_seed(1)))
        assert not torch.equal(q, rotation(n, torch.Generator().manual_seed(2)))


def _qwen2():
    # biases on q/k/v (the value bias is rotated per head), grouped-query attention, tied head
    config = Qwen2Config(vocab_size=300, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).float().eval()
    with torch.no_grad():  # random norms and biases, so folding them is tested (defaults are 1 and 0)
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("make", ["llama", "qwen2"])
def test_rotated_model_gives_the_same_logits(make, tiny_dir):
    model = _qwen2() if make == "qwen2" else sources.load(str(tiny_dir))[0]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    ids = torch.randint(0, model.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    before = model(ids).logits
    record = rotate(model, seed=3)
    after = model(ids).logits
    assert record["kind"] == "hadamard" and record["seed"] == 3
    assert ((after - before).abs().max() / before.abs().max()).item() < 1e-4
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert not model.config.tie_word_embeddings


def test_export_rotate_records_and_serves_the_rotated_model(tiny_dir, tmp_path):
    plain = fqcompile.export(str(tiny_dir), tmp_path / "plain", ladder=(4, 8), group_size=32, progress=False)
    out = fqcompile.export(str(tiny_dir), tmp_path / "rot", ladder=(4, 8), group_size=32, rotate=True, progress=False)
    manifest = json.loads((out / "fqcompile.json").read_text())
    assert manifest["rotation"]["kind"] == "hadamard" and manifest["grid"] == "lowest-rung"
    assert manifest["source"]["model"] == str(tiny_dir.resolve())
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(1))
    source = sources.load(str(tiny_dir))[0]
    ref = source(ids).logits.double()
    for folder in (plain, out):
        loaded = fqcompile.load(folder)
        fqcompile.set_precision(loaded.model, 8)
        got = loaded.model(ids).logits.double()
        # at 8 bits both checkpoints are close to the source model: the rotation changed no function
        assert ((got - ref).norm() / ref.norm()).item() < 0.02, folder
    again = fqcompile.export(str(tiny_dir), tmp_path / "rot2", ladder=(4, 8), group_size=32, rotate=True,
                             progress=False)
    same = json.loads((again / "fqcompile.json").read_text())["files"]
    assert {k: v["sha256"] for k, v in same.items()} == {k: v["sha256"] for k, v in manifest["files"].items()}


def test_rotate_refuses_unknown_architectures(tmp_path):
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100))
    with pytest.raises(FqError, match="supports LlamaForCausalLM.*not GPT2LMHeadModel"):
        rotate(model)
