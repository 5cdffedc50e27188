"""Shared fixtures: the built-in model, a small random Llama with its tokenizer, real text."""

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
AUSTEN = REPO.parent / "shared" / "data" / "austen"
# `python -m pytest` from the checkout puts it first on sys.path, where kernels/ would import as
# the top-level `kernels` that transformers looks for; fqcompile itself comes from the install.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO]
# Triton reads TRITON_INTERPRET when it is first imported, and more than our Triton test imports
# it (transformers does, for Qwen2 models among others): without a GPU its kernels run in the
# interpreter, whichever test imports it first.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def austen() -> Path:
    if not AUSTEN.is_dir():
        pytest.fail(f"real text expected in {AUSTEN} (the shared/ folder beside the repository)")
    return AUSTEN


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    """The built-in SmolLM2 model as a cached HF folder (converted once per machine)."""
    from fqcompile import sources

    return sources.resolve(sources.BUILTIN_NAME)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, smol_dir) -> Path:
    """A random-weight Llama (SmolLM2 tokenizer) whose widths exercise padding and ragged groups.

    hidden 72 (not a multiple of 32), intermediate 196 (not a multiple of 8).
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1234)
    tok = AutoTokenizer.from_pretrained(smol_dir)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=72, intermediate_size=196, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
        tie_word_embeddings=True, rope_theta=10000.0,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger-than-init weights so quantization error is visible but finite
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
    out = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tiny_dir) -> Path:
    """Tiny model exported with ladder [4, 8], group size 32."""
    import fqcompile

    out = tmp_path_factory.mktemp("ckpt") / "tiny-48"
    return fqcompile.export(str(tiny_dir), out, ladder=(4, 8), group_size=32, progress=False)


@pytest.fixture
def ckpt_copy(tiny_ckpt, tmp_path) -> Path:
    """A private copy of the tiny checkpoint that a test may damage."""
    dst = tmp_path / "copy"
    shutil.copytree(tiny_ckpt, dst)
    return dst


@pytest.fixture(autouse=True, scope="session")
def _quiet_env():
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def oracle_weight():
    """The float64 dequantization oracle, written from docs/format.md, not from the code."""

    def weight(codes, scale, zero, ladder, bits, group_size, grid="lowest-rung", zero_offset=0):
        q_b = (codes.long() >> (ladder[-1] - bits)).double()
        cells = 2.0 ** (bits - ladder[0])
        s, z = scale.double(), zero.double()
        g = torch.arange(codes.shape[1]) // group_size
        if grid == "lowest-rung":
            # the centre of cell q_b of the lowest rung's grid, in units of that grid's step
            return s[:, g] * ((q_b + 0.5) / cells - 0.5 - z[:, g])
        assert grid == "zero-exact"
        # the b-bit zero point is the top b bits of the master zero point z * 2^(B - b0) + zero_offset
        z_b = torch.div(z[:, g] * 2.0 ** (ladder[-1] - ladder[0]) + zero_offset, 2.0 ** (ladder[-1] - bits),
                        rounding_mode="floor")
        return s[:, g] / cells * (q_b - z_b)

    return weight
