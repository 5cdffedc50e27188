"""The decode step's glue ops (kernels/ops.py: rms_norm, attend, gated, entropy): the C++ CPU
kernels against the references computed in float64."""

import os
import shutil

import pytest
import torch

from fqcompile.kernels import backend
from fqcompile.kernels import ops


@pytest.fixture(scope="module", autouse=True)
def cpu_kernels():
    """Skipped only where there is no compiler: a machine with one must build the kernels."""
    if backend(torch.device("cpu")) != "cpu-cpp":
        if shutil.which(os.environ.get("CXX", "c++")):
            pytest.fail("a C++ compiler is here but the CPU kernels did not build (see the warning above)")
        pytest.skip("no C++ compiler here: the CPU kernels cannot be built")


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("shape", [(1, 1, 576), (2, 5, 72), (3, 64)])
def test_rms_norm_matches_float64(shape):
    torch.manual_seed(0)
    x, w = torch.randn(shape) * 3 + 0.5, torch.rand(shape[-1]) + 0.5
    got = ops.rms_norm(x, w, 1e-5)
    want = ops.rms_norm_reference(x.double(), w.double(), 1e-5)
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert rel(got, want) < 1e-6


def test_rms_norm_other_dtypes_take_the_reference():
    x, w = torch.randn(2, 64, dtype=torch.bfloat16), torch.rand(64, dtype=torch.bfloat16)
    assert torch.equal(ops.rms_norm(x, w, 1e-6), ops.rms_norm_reference(x, w, 1e-6))


def test_gemma_norm_on_bfloat16_is_hugging_faces():
    """Gemma applies its 1 + w in float32 and casts once: a float32 weight on bf16 x does the same."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    torch.manual_seed(9)
    norm = Gemma3RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(0, 0.3)
    x = (torch.randn(3, 64) * 2).bfloat16()
    assert torch.equal(ops.rms_norm(x, norm.weight.detach() + 1, 1e-6), norm(x))


def rope_tables(b, t, d, start):
    """cos, sin [b, t, d] for positions start .. start + t - 1 over d rotated dims."""
    pos = torch.arange(start, start + t, dtype=torch.float64)[None].expand(b, t)
    freq = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = torch.cat([pos[..., None] * freq] * 2, dim=-1)
    sin = angle.sin()
    sin[..., : d // 2] *= -1  # the ops' convention: first half negated
    return angle.cos(), sin


# head sizes: 16 (scalar value sums), 64 (vector), 80 (vector plus a scalar tail)
@pytest.mark.parametrize("b,t,heads,kv,start,masked,d", [(1, 1, 9, 3, 37, False, 64), (2, 5, 4, 2, 3, True, 16),
                                                          (3, 1, 4, 4, 0, False, 80), (2, 4, 6, 2, 0, True, 64),
                                                          (1, 1, 4, 2, 40, False, 16)])
def test_attend_matches_float64(b, t, heads, kv, start, masked, d):
    torch.manual_seed(1)
    cap = 48
    qkv = torch.randn(b, t, (heads + 2 * kv) * d)
    cos, sin = (x.float() for x in rope_tables(b, t, d, start))
    k_cache, v_cache = torch.randn(b, kv, cap, d), torch.randn(b, kv, cap, d)  # stale slots must be overwritten
    mask = None
    if masked:
        mask = torch.rand(b, 1, t, start + t) > 0.3
        mask[..., torch.arange(t), start + torch.arange(t)] = True  # every query sees at least itself
    k64, v64 = k_cache.double(), v_cache.double()
    want = ops.attend_reference(qkv.double(), cos.double(), sin.double(), k64, v64, start, heads, mask)
    got = ops.attend(qkv, cos, sin, k_cache, v_cache, start, heads, mask)
    assert got.shape == (b, t, heads * d)
    assert rel(got, want) < 1e-5
    assert rel(k_cache, k64) < 1e-6 and rel(v_cache, v64) < 1e-6  # the same slots written, the same values


def test_attend_refuses_slots_outside_the_cache():
    qkv = torch.randn(1, 2, 3 * 8)
    cos = sin = torch.ones(1, 2, 8)
    cache = torch.zeros(1, 1, 4, 8)
    with pytest.raises(RuntimeError, match="outside the cache"):
        ops.attend(qkv, cos, sin, cache, cache.clone(), 3, 1)
    with pytest.raises(RuntimeError, match="outside the cache"):  # a ring, but 2 queries need window + 1 slots
        ops.attend(qkv, cos, sin, cache, cache.clone(), 3, 1, window=4)
    with pytest.raises(RuntimeError, match="outside the cache"):
        ops.attend_reference(qkv, cos, sin, cache, cache.clone(), 3, 1, window=4)


# qk-norm (Qwen3, Gemma 3), partial rotary (Phi-4-mini: 3/4 of a head), a query scale (Gemma 3)
@pytest.mark.parametrize("qk_norm,rotary,scale,d", [(True, 64, 0.0, 64), (False, 48, 0.0, 64), (True, 16, 0.0625, 16),
                                                    (True, 256, 0.03, 256)])
def test_attend_variants_match_float64(qk_norm, rotary, scale, d):
    torch.manual_seed(6)
    b, t, heads, kv, start, cap = 2, 3, 4, 2, 5, 16
    qkv = torch.randn(b, t, (heads + 2 * kv) * d) * 2
    cos, sin = (x.float() for x in rope_tables(b, t, rotary, start))
    norms = (torch.rand(d) + 0.5, torch.rand(d) + 0.5) if qk_norm else (None, None)
    mask = torch.rand(b, 1, t, start + t) > 0.3
    mask[..., torch.arange(t), start + torch.arange(t)] = True
    k_cache, v_cache = torch.randn(b, kv, cap, d), torch.randn(b, kv, cap, d)
    k64, v64 = k_cache.double(), v_cache.double()
    n64 = [n.double() if n is not None else None for n in norms]
    want = ops.attend_reference(qkv.double(), cos.double(), sin.double(), k64, v64, start, heads, mask, *n64, 1e-6, scale)
    got = ops.attend(qkv, cos, sin, k_cache, v_cache, start, heads, mask, *norms, 1e-6, scale)
    assert rel(got, want) < 1e-5 and rel(k_cache, k64) < 1e-6
    # the scale is applied (0 means 1/sqrt(d))
    plain = ops.attend_reference(qkv.double(), cos.double(), sin.double(), k64.clone(), v64.clone(), start, heads, mask,
                                 *n64, 1e-6, 0.0)
    assert (scale == 0.0) == (rel(plain, want) < 1e-12)


@pytest.mark.parametrize("d", [16, 80])  # the value sums' scalar loop; their vector loop plus a tail
@pytest.mark.parametrize("masked", [False, True])
def test_ring_cache_attends_as_a_full_cache_with_a_window(masked, d):
    """A sliding-window layer keeps window + chunk - 1 slots: a prefill of 5, a chunk of 3 and
    single tokens past the window give what a cache of the whole sequence gives with the
    window applied (Hugging Face's: slot j is seen from slot i when j > i - window)."""
    torch.manual_seed(7)
    b, heads, kv, window, total = 2, 4, 2, 8, 30
    # single tokens, and a chunk of 3 whose queries see different runs of the wrapped ring
    steps = [(0, 5), (5, 3)] + [(s, 1) for s in range(8, 20)] + [(20, 3)] + [(s, 1) for s in range(23, total)]
    ring = [torch.randn(b, kv, window + 5 - 1, d) for _ in range(2)]  # stale values everywhere
    full = [torch.zeros(b, kv, total, d, dtype=torch.float64) for _ in range(2)]
    keys = torch.rand(b, total) > 0.2
    keys[:, 4:] = True  # row padding sits in the prompt
    keys[:, 0] = True
    for start, t in steps:
        qkv = torch.randn(b, t, (heads + 2 * kv) * d)
        cos, sin = (x.float() for x in rope_tables(b, t, d, start))
        causal = torch.ones(t, start + t, dtype=torch.bool).tril(start)
        if masked:  # padding, but every query sees itself
            mask = ((keys[:, None, :start + t] & causal) | (torch.arange(start + t) == start + torch.arange(t)[:, None]))
            mask = mask[:, None]
        else:
            mask = None if t == 1 else causal.expand(b, 1, t, start + t)
        got = ops.attend(qkv, cos, sin, *ring, start, heads, mask, window=window)
        want = ops.attend_reference(qkv.double(), cos.double(), sin.double(), *full, start, heads, mask, window=window)
        assert rel(got, want) < 1e-5, (start, t)
        # the reference's window is the mask a full cache would need
        near = torch.arange(start + t) > (start + torch.arange(t))[:, None] - window
        again = ops.attend_reference(qkv.double(), cos.double(), sin.double(), *[c.clone() for c in full], start, heads,
                                     near if mask is None else mask & near)
        assert rel(again, want) < 1e-12
    assert start + t > 3 * window  # the ring went round


@pytest.mark.parametrize("scale", [0.1, 3.0, 30.0])
def test_entropy_matches_float64(scale):
    torch.manual_seed(2)
    logits = torch.randn(3, 49152 + 5) * scale  # a vocabulary that is not a multiple of the vector width
    logits[1, :100] = -1e4  # probabilities that underflow to zero
    want = ops.entropy_reference(logits.double())
    got = ops.entropy(logits)
    # relative 1e-5, plus 2e-7 nats: a float32 sum of e^(x - max) near 1 carries ~1e-7
    # absolute error into log Z, which dominates when the entropy itself is ~0.01 nats
    # (the controller's thresholds are tenths of a nat)
    assert got.shape == (3,) and bool(((got - want).abs() <= 1e-5 * want + 2e-7).all()), (got, want)


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 2 * 1536), (3, 2, 2 * 196), (5, 2 * 7)])
def test_gated_matches_float64(shape, gelu):
    torch.manual_seed(3)
    gate_up = torch.randn(shape) * 6  # both signs, and large |x| where e^-x under/overflows
    got = ops.gated(gate_up, gelu)
    want = ops.gated_reference(gate_up.double(), gelu)
    assert got.shape == (*shape[:-1], shape[-1] // 2) and rel(got, want) < 1e-6
    other = ops.gated_reference(gate_up.double(), not gelu)
    assert rel(other, want) > 1e-3  # SiLU and GELU-tanh differ: the flag is not ignored


def test_entropy_ignores_minus_infinity():
    logits = torch.randn(2, 100)
    logits[0, :40] = float("-inf")  # e.g. masked vocabulary
    got, want = ops.entropy(logits), ops.entropy_reference(logits.double())
    assert torch.isfinite(got).all() and float(((got - want) / want).abs().max()) < 1e-5
    wide = torch.randn(2, 3 * 8192 + 7) * 4  # several chunks (one per thread's share), one all -inf
    wide[0, 8192:2 * 8192] = float("-inf")
    wide[1, :8192] -= 30  # a chunk whose own max is far below the row's
    got, want = ops.entropy(wide), ops.entropy_reference(wide.double())
    assert float(((got - want) / want).abs().max()) < 1e-5


def test_entropy_of_bfloat16_logits_answers_in_float32():
    # The controller's signal under Hugging Face generate in bf16: rounding the entropy to
    # bf16 (steps of 1/16 nat near 10) would blur bucket edges that sit ~1e-3 apart.
    torch.manual_seed(5)
    logits = (torch.randn(2, 1, 1000) * 2).bfloat16()
    got, want = ops.entropy(logits), ops.entropy_reference(logits.double())
    assert got.dtype == torch.float32 and got.shape == (2, 1)
    assert float(((got - want) / want).abs().max()) < 1e-5


def test_attend_takes_the_reference_for_float_masks_and_other_dtypes():
    torch.manual_seed(4)
    qkv = torch.randn(1, 2, 4 * 8)
    cos, sin = (x.float() for x in rope_tables(1, 2, 8, 0))
    additive = torch.tensor([[0.0, float("-inf")], [0.0, 0.0]])[None, None]  # SDPA adds a float mask
    caches = [torch.zeros(1, 1, 4, 8) for _ in range(4)]
    got = ops.attend(qkv, cos, sin, caches[0], caches[1], 0, 2, additive)
    want = ops.attend_reference(qkv, cos, sin, caches[2], caches[3], 0, 2, additive)
    assert torch.equal(got, want)
    half = ops.attend(qkv, cos.bfloat16(), sin.bfloat16(), *[torch.zeros(1, 1, 4, 8) for _ in range(2)], 0, 2)
    assert half.shape == (1, 2, 16) and torch.isfinite(half).all()
