"""The slim decoder against the Hugging Face path on the same checkpoint and precision plan."""

import pytest
import torch

import fqcompile
from fqcompile import decoding, flex_linear, loader, slim
from fqcompile.errors import FqError

from slim_checks import PROMPTS, check_agreement, greedy_logits, stack_and_loop


@pytest.mark.parametrize("bits", [4, 8])
def test_logits_agree_with_hugging_face_every_step(tiny_ckpt, bits):
    worst = check_agreement(fqcompile.load(tiny_ckpt), bits, steps=24)
    assert worst <= 1e-4, worst


@pytest.mark.slow
def test_logits_agree_on_the_builtin_model(tmp_path):
    from fqcompile import sources

    folder = fqcompile.export(sources.BUILTIN_NAME, tmp_path / "ckpt", ladder=(4, 8), progress=False)
    loaded = fqcompile.load(folder)
    for bits in (4, 8):
        worst = check_agreement(loaded, bits, steps=64)
        assert worst <= 1e-4, (bits, worst)


def test_layers_stay_switchable_after_fusion(tiny_ckpt):
    """Fusion turns the layers' planes into views: the HF path still works, at every precision."""
    loaded = fqcompile.load(tiny_ckpt)
    ids = torch.tensor([[1, 5, 9, 14]])
    before = {b: (fqcompile.set_precision(loaded.model, b), loaded.model(ids).logits)[1] for b in (4, 8)}
    slim.Decoder(loaded.model)
    for b in (4, 8):
        fqcompile.set_precision(loaded.model, b)
        assert torch.equal(loaded.model(ids).logits, before[b])


def test_sampling_is_seeded_and_respects_top_k():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    a = decoding.pick(logits, 0.8, 5, 1.0, torch.Generator().manual_seed(1))
    b = decoding.pick(logits, 0.8, 5, 1.0, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    top5 = logits.topk(5).indices
    for _ in range(20):
        t = decoding.pick(logits, 1.5, 5, 0.9, torch.Generator().manual_seed(_))
        assert all(t[r] in top5[r] for r in range(4))
    assert torch.equal(decoding.pick(logits, 0.0, 0, 1.0, None), logits.argmax(-1))
    logits[1, 7] = logits[1, 3] = logits[1].max() + 1  # a tie: the first maximum, as argmax
    assert decoding.pick(logits, 0.0, 0, 1.0, None)[1] == 3
    assert torch.equal(decoding.pick(logits.double(), 0.0, 0, 1.0, None), logits.argmax(-1))


def test_refuses_unsupported_models(tiny_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    assert "architecture GPT2LMHeadModel" in slim.unsupported(gpt2)
    with pytest.raises(FqError, match="does not support"):
        slim.Decoder(gpt2)


def test_quantized_head_runs_at_8_bits_on_both_engines(tiny_ckpt):
    from fqcompile.flex_linear import FlexLinear

    plain, quant = fqcompile.load(tiny_ckpt), fqcompile.load(tiny_ckpt, quantized_head=True)
    head = quant.model.get_output_embeddings()
    assert isinstance(head, FlexLinear) and head.precision == 8
    fqcompile.set_precision(quant.model, 4)
    assert head.precision == 8  # precision plans drive the checkpoint's layers, not the head
    assert check_agreement(quant, 4, steps=8) <= 1e-4
    fqcompile.set_precision(plain.model, 4)
    ids = torch.tensor([[1, 5, 9, 200, 7]])
    with torch.inference_mode():
        exact, rounded = plain.model(ids).logits, quant.model(ids).logits
    assert float((exact - rounded).norm() / exact.norm()) < 0.01


def random_checkpoint(tmp_path, smol_dir, model_class, config_class, prepare=None):
    """A 2-layer random model with SmolLM2's tokenizer, widths 64 / 160 (multiples of 16),
    exported RTN [4, 8] with group size 32; `prepare(model)` runs before it is saved."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_dir)
    model = model_class(config_class(
        vocab_size=len(tok), hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    if prepare is not None:
        prepare(model)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    return fqcompile.export(str(tmp_path / "model"), tmp_path / "ckpt", ladder=(4, 8), group_size=32, progress=False)


def test_cpp_stack_is_the_per_op_loop_bit_for_bit(tiny_ckpt):
    """The one-call C++ stack (kernels/cpu_stack.cpp) against the per-op loop, on a mixed plan.

    Layer 0 at 4 bits with int8 activations on its attention, layer 1 at 8 bits; padded
    prompts (a bool mask every step).
    """
    loaded = fqcompile.load(tiny_ckpt)
    fast, slow, served, plan = stack_and_loop(loaded, PROMPTS, 12, "self_attn")
    assert served and plan[0][:8] == [4, 4, 4, 4, 8, 8, 8, 8]
    assert torch.equal(fast, slow)


def test_stack_holds_the_packed_rows_in_place_of_the_planes(tmp_path, smol_dir):
    """int8 decode on AVX2 builds reads the planes packed 8 rows at a time: the layers then hold
    nothing else (fused parts hold row views of their fused layer's packs), the stack agrees
    with the per-op loop bit for bit at 8 and at 4 bits, and float activations get the nested
    planes back unchanged. Widths of multiples of 16, so every projection can be packed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fqcompile.kernels import packs_rows

    torch.manual_seed(8)
    loaded = fqcompile.load(random_checkpoint(tmp_path, smol_dir, LlamaForCausalLM, LlamaConfig))
    tok = loaded.tokenizer
    rows = [tok(p)["input_ids"] for p in PROMPTS]
    dec = slim.Decoder(loaded.model)
    layers = loader.flex_layers(loaded.model)
    nested = {id(m): [p.clone() for p in m.planes()] for m in layers}
    float_logits = greedy_logits(dec, rows, 4, tok.eos_token_id)
    loader.set_int8_activations(loaded.model, True)
    fast = {}
    for bits in (8, 4):
        fqcompile.set_precision(loaded.model, bits)
        fast[bits] = greedy_logits(dec, rows, 6, tok.eos_token_id)
        runs = [run for slots in dec.slots for run, _ in slots]
        assert dec.stack is not None and all(bool(run.packed(bits)) == packs_rows() for run in runs)
        if packs_rows():
            assert all(m.plane0 is None and m.packed(8) for m in layers + runs)
            q, k = dec.blocks[0]["qkv"].parts[:2]
            assert q.packed(8)[0].data_ptr() == runs[0].packed(8)[0].data_ptr()  # views, not copies
            assert k.packed(8)[0].data_ptr() == runs[0].packed(8)[0][q.out_features // 8:].data_ptr()
    dec.use_stack = False
    for bits in (8, 4):
        fqcompile.set_precision(loaded.model, bits)
        assert torch.equal(fast[bits], greedy_logits(dec, rows, 6, tok.eos_token_id))
    dec.use_stack = True
    loader.set_int8_activations(loaded.model, False)
    fqcompile.set_precision(loaded.model, 8)
    assert torch.equal(float_logits, greedy_logits(dec, rows, 4, tok.eos_token_id))
    assert all(all(torch.equal(a, b) for a, b in zip(m.planes(), nested[id(m)])) for m in layers)


def test_cached_plan_follows_every_way_of_switching(tiny_ckpt):
    """The plan is reused between steps: any change to a layer's settings must reach it."""
    loaded = fqcompile.load(tiny_ckpt)
    dec = slim.Decoder(loaded.model)
    o_proj = loaded.model.model.layers[0].self_attn.o_proj
    assert dec.stack_plan()[0][1] == 8 and dec.stack_plan()[1][1] == 0
    object.__setattr__(o_proj, "precision", 4)  # no nn.Module checks
    assert dec.stack_plan()[0][1] == 4
    flex_linear.set_precisions([o_proj], 8)  # as the controller sets it
    assert dec.stack_plan()[0][1] == 8
    o_proj.set_precision(4)
    o_proj.int8_activations = True
    assert dec.stack_plan()[1][1] == 1
    fqcompile.set_precision(loaded.model, 8)
    assert dec.stack_plan()[0][1] == 8
    with loader.dense_weights(loaded.model):
        assert dec.stack_plan() is None  # dense weights run through the per-op loop
    assert dec.stack_plan() is not None


def test_plan_falls_back_when_fused_parts_disagree(tiny_ckpt):
    loaded = fqcompile.load(tiny_ckpt)
    dec = slim.Decoder(loaded.model)
    assert dec.stack_plan() is not None
    loaded.model.model.layers[1].self_attn.k_proj.set_precision(4)  # q and v stay at 8
    assert dec.stack_plan() is None
    tok = loaded.tokenizer
    rows = [tok(PROMPTS[0])["input_ids"]]
    assert len(decoding.generate(dec, rows, 4, stop_ids=[], pad=tok.eos_token_id)[0]) == 4


def test_qwen2_with_qkv_bias_agrees_with_hugging_face(tmp_path, smol_dir):
    """Qwen2 puts a bias on q/k/v: the fused projection carries it, on the stack and in HF."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    def noisy_biases(model):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.5)  # non-zero: a dropped bias must show

    torch.manual_seed(7)
    ckpt = random_checkpoint(tmp_path, smol_dir, Qwen2ForCausalLM, Qwen2Config, noisy_biases)
    loaded = fqcompile.load(ckpt)
    assert loaded.model.model.layers[0].self_attn.q_proj.bias is not None
    for bits in (4, 8):
        assert check_agreement(loaded, bits, steps=8) <= 1e-4


def test_stack_refuses_a_projection_of_the_wrong_size(tiny_ckpt):
    """The stack calls its kernels directly: a mismatched projection must raise, not write out of bounds."""
    loaded = fqcompile.load(tiny_ckpt)
    dec = slim.Decoder(loaded.model)
    dec.setup_cache(1, 8)
    dec.stack_plan()  # the stack gets its projections
    qkv = dec.blocks[0]["qkv"].fused  # wider than the hidden size
    dec.stack.set_linear(0, 1, 8, *qkv.call_args(8), None, [])  # ... put where the o projection goes
    with pytest.raises(RuntimeError, match="does not match the hidden state"):
        dec(torch.tensor([[1, 2]]), torch.tensor([[0, 1]]), 0)
    dec.to(torch.float32)
    assert dec.stack is None  # a .to() drops the stack until the next cache setup
