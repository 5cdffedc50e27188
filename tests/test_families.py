"""The slim decoder on the families beyond Llama (Qwen3, Gemma 3, Phi-3, Mistral past its window):
random-weight models built from each family's config class, against Hugging Face's logits."""

import pytest
import torch
from torch import nn

import fqcompile
from fqcompile import generation, loader, slim
from fqcompile.errors import FqError

from slim_checks import PROMPTS, check_agreement, stack_and_loop

LONG = PROMPTS + ["She was the youngest of the two daughters of a most affectionate, indulgent father; and had"]
STEPS = 64


def noisy_norms(model):
    """Norm weights away from their init (Gemma's are 0, meaning 1 + 0): a dropped or misread one must show."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)


def family_model(folder, smol_dir, model_class, config):
    """A random-weight model of the family with SmolLM2's tokenizer, saved to `folder`."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_dir)
    config.vocab_size, config.bos_token_id, config.eos_token_id = len(tok), tok.bos_token_id, tok.eos_token_id
    model = model_class(config).eval()
    noisy_norms(model)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok


def family_checkpoint(tmp_path, smol_dir, model_class, config):
    model, _ = family_model(tmp_path / "model", smol_dir, model_class, config)
    linears = sum(isinstance(m, nn.Linear) for m in model.modules()) - 1  # all but the head
    ckpt = fqcompile.export(str(tmp_path / "model"), tmp_path / "ckpt", ladder=(4, 8), group_size=32, progress=False)
    loaded = fqcompile.load(ckpt)
    assert len(loader.flex_layers(loaded.model)) == linears  # every linear quantized, fused ones included
    return loaded


def qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    # head_dim 32 with 4 heads of a 64-wide model: independent of hidden / heads
    return Qwen3ForCausalLM, Qwen3Config(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                         max_position_embeddings=256, tie_word_embeddings=True)


def gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    # local (window 16, RoPE base 10k) and global (base 1M) layers, one kv head, a query scale
    # other than head_dim, final logit soft-capping
    return Gemma3ForCausalLM, Gemma3TextConfig(
        hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
        head_dim=32, sliding_window=16, query_pre_attn_scalar=24, final_logit_softcapping=5.0,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], max_position_embeddings=256,
        tie_word_embeddings=True)


def phi3():
    from transformers import Phi3Config, Phi3ForCausalLM

    # fused qkv_proj / gate_up_proj, 3/4 of each 16-dim head rotated (Phi-4-mini), long RoPE
    # (short factors within the original 128 positions), a 20-token window
    factors = [1.0 + 0.1 * i for i in range(6)]
    return Phi3ForCausalLM, Phi3Config(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, original_max_position_embeddings=128, sliding_window=20,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                         "short_factor": factors, "long_factor": [2 * f for f in factors],
                         "original_max_position_embeddings": 128},
        tie_word_embeddings=False, pad_token_id=0)


def mistral():
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM, MistralConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, sliding_window=24,
                                             max_position_embeddings=256, tie_word_embeddings=True)


@pytest.mark.parametrize("family", [qwen3, gemma3, phi3, mistral])
def test_logits_agree_with_hugging_face_past_the_window(tmp_path, smol_dir, family):
    """64 greedy steps, four left-padded prompts, at 4 and 8 bits: every step's logits within
    1e-4 of Hugging Face's on the same sequences; the sequences outgrow every sliding window."""
    torch.manual_seed(11)
    model_class, config = family()
    loaded = family_checkpoint(tmp_path, smol_dir, model_class, config)
    assert slim.unsupported(loaded.model, length=100) is None
    assert generation.choose_engine(loaded, "auto", length=100)[0] == "slim"
    dec = slim.Decoder(loaded.model)
    for bits in (4, 8):
        assert check_agreement(loaded, bits, steps=STEPS, prompts=LONG, dec=dec) <= 1e-4, bits
    assert dec.stack is not None  # the C++ stack served it
    # a sliding-window layer's cache is a ring of window + prompt - 1 slots, shorter than the sequence
    assert all(k.shape[2] < STEPS for (k, _), w in zip(dec.caches, slim.windows(loaded.model.config)) if w)


def test_stack_is_the_per_op_loop_on_gemma(tmp_path, smol_dir):
    """Gemma's extra norms, qk-norm, GeGLU, two RoPE tables and ring caches: the one-call C++
    stack agrees with the per-op loop bit for bit, at a mixed plan with int8 activations."""
    torch.manual_seed(12)
    loaded = family_checkpoint(tmp_path, smol_dir, *gemma3())
    fast, slow, served, plan = stack_and_loop(loaded, LONG, 30, "mlp")
    assert served and plan is not None
    assert torch.equal(fast, slow)


def test_long_rope_past_its_original_length_goes_to_hugging_face(tmp_path, smol_dir):
    torch.manual_seed(13)
    loaded = family_checkpoint(tmp_path, smol_dir, *phi3())
    assert slim.unsupported(loaded.model, length=128) is None
    assert "long RoPE beyond its original length (129 tokens, original 128)" in slim.unsupported(loaded.model, 129)
    name, why = generation.choose_engine(loaded, "auto", length=129)
    assert name == "hf" and "original 128" in why
    with pytest.raises(FqError, match="long RoPE"):
        generation.choose_engine(loaded, "slim", length=129)


def test_quantized_head_covers_a_tied_embedding(tmp_path, smol_dir):
    """Gemma ties its head to the embedding: the head is quantized, the lookup keeps the float table."""
    from fqcompile.flex_linear import FlexLinear

    torch.manual_seed(14)
    model_class, config = gemma3()
    loaded = family_checkpoint(tmp_path, smol_dir, model_class, config)
    quant = fqcompile.load(loaded.folder, quantized_head=True)
    head, embed = quant.model.get_output_embeddings(), quant.model.get_input_embeddings()
    assert isinstance(head, FlexLinear) and head.precision == 8
    assert torch.equal(embed.weight, loaded.model.get_input_embeddings().weight)
    assert check_agreement(quant, 8, steps=8, prompts=LONG) <= 1e-4
    ids = torch.tensor([[1, 5, 9, 200, 7]])
    with torch.inference_mode():
        exact, rounded = loaded.model(ids).logits, quant.model(ids).logits
    assert 0 < float((exact - rounded).norm() / exact.norm()) < 0.01


def test_gptq_feeds_every_block_its_own_mask_and_rope(tmp_path, smol_dir):
    """Block-by-block GPTQ runs each block alone: a global layer of Gemma 3 needs the global
    RoPE table and the full mask, not the first (local) block's. With the float weights, the
    blocks chained from what first_inputs records give Hugging Face's hidden states."""
    from fqcompile.calibration import gptq_blocks
    from fqcompile.sources import materialize_buffers, meta_model

    torch.manual_seed(15)
    model, tok = family_model(tmp_path / "model", smol_dir, *gemma3())
    ids = torch.tensor([tok(" ".join(LONG))["input_ids"][:40]])  # past the 16-token window
    with torch.inference_mode():
        want = model(ids, output_hidden_states=True).hidden_states  # embeddings, then each block's output
    meta, _ = meta_model(tmp_path / "model")
    files = gptq_blocks.weight_files(tmp_path / "model")
    gptq_blocks.materialize(meta, "model.embed_tokens", files)
    materialize_buffers(meta)
    hidden, kwargs = gptq_blocks.first_inputs(meta, ids, batch_size=1)
    assert len(kwargs) == 3 and all(len(k) == 1 for k in kwargs)
    h = hidden[0]
    with torch.inference_mode():
        for i in range(2):  # the last block's output is normed in hidden_states
            block = gptq_blocks.materialize(meta, f"model.layers.{i}", files)
            h = block(h, **kwargs[i][0])
            h = h[0] if isinstance(h, tuple) else h
            assert float((h - want[i + 1]).norm() / want[i + 1].norm()) < 1e-5, i


@pytest.mark.parametrize("family", [qwen3, gemma3, phi3])
def test_gptq_export_of_each_family_is_exact(tmp_path, smol_dir, austen, family):
    """Qwen3's and Gemma's q/k/v and gate/up, Phi-3's fused layers: a zero-exact rung exports
    exactly and the export, dequantized as a GPTQ loader does, has fqcompile's perplexity."""
    from fqcompile.gptq_export import export_gptq

    torch.manual_seed(16)
    family_model(tmp_path / "model", smol_dir, *family())
    ckpt = fqcompile.export(str(tmp_path / "model"), tmp_path / "ckpt", ladder=(4, 8), group_size=32,
                            grid="zero-exact", progress=False)
    record = export_gptq(ckpt, tmp_path / "gptq", "static:8", dataset=str(austen / "emma.txt"), samples=2, seq_len=48,
                         progress=False)
    assert record["exact"]["identical"]
    assert record["quality"]["perplexity"] == pytest.approx(record["quality"]["fqcompile_perplexity"], rel=1e-4)
