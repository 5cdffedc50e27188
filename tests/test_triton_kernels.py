"""The Triton kernels, run on the CPU in Triton's interpreter (and on a GPU when there is one)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module is imported

import pytest  # noqa: E402
import torch  # noqa: E402

from fqcompile.formats.nested import GRIDS, ZERO_EXACT, Layout, pack_planes, quantize_rtn  # noqa: E402
from fqcompile.kernels import triton_nested  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and os.environ["TRITON_INTERPRET"] != "1" else "cpu"
LADDERS = [(4, 8), (2, 3, 4, 6, 8), (3, 8), (8,)]
# Not multiples of the blocks (64 features, 128 / 64 columns), ragged groups, odd rows.
SHAPES = [((70, 200), 64), ((33, 576), 128), ((17, 61), 32), ((65, 136), 128)]
BATCHES = (1, 3, 8, 9, 40)  # GEMV tile up to 8 rows, GEMM tile (tl.dot) above


def make(shape, group, ladder, seed=0, grid=ZERO_EXACT):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * 0.05
    layout = Layout(*shape, group_size=group, ladder=ladder, grid=grid)
    codes, scale, zero = quantize_rtn(w, group, ladder, grid)
    planes = [p.to(DEVICE) for p in pack_planes(codes, layout)]
    return layout, codes, scale.to(DEVICE), zero.to(DEVICE), planes


def run(x, layout, planes, scale, zero, bits):
    """The kernel into an output poisoned with NaN, so any element left unwritten shows."""
    n = layout.planes_for(bits)
    y = torch.full((x.shape[0], layout.out_features), float("nan"), dtype=x.dtype, device=x.device)
    triton_nested.launch(x, planes[:n], layout.widths[:n], scale, zero, layout.ladder[0], layout.offset(bits),
                         layout.group_size, y)
    assert not y.isnan().any(), "output not fully written"
    return y


@pytest.mark.parametrize("ladder", LADDERS)
@pytest.mark.parametrize("shape,group", SHAPES)
@pytest.mark.parametrize("grid", list(GRIDS))
def test_triton_matches_float64(ladder, shape, group, grid, oracle_weight):
    layout, codes, scale, zero, planes = make(shape, group, ladder, seed=shape[0], grid=grid)
    gen = torch.Generator().manual_seed(3)
    for m in BATCHES:
        x = (torch.randn(m, shape[1], generator=gen) + 0.5).to(DEVICE)
        for bits in ladder:
            w64 = oracle_weight(codes, scale.cpu(), zero.cpu(), ladder, bits, group, grid, layout.zero_offset)
            ref = x.double().cpu() @ w64.T
            y = run(x, layout, planes, scale, zero, bits).double().cpu()
            assert ((y - ref).norm() / ref.norm()).item() <= 1e-5, (m, bits)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.5e-2)])
@pytest.mark.parametrize("m", [2, 24])
def test_triton_low_precision_activations(dtype, tol, m, oracle_weight):
    layout, codes, scale, zero, planes = make((70, 200), 64, (4, 8))
    x = torch.randn(m, 200, generator=torch.Generator().manual_seed(m)).to(dtype).to(DEVICE)
    for bits in (4, 8):
        w64 = oracle_weight(codes, scale.cpu(), zero.cpu(), (4, 8), bits, 64, layout.grid, layout.zero_offset)
        ref = x.double().cpu() @ w64.T
        y = run(x, layout, planes, scale, zero, bits)
        assert y.dtype == dtype
        assert ((y.double().cpu() - ref).norm() / ref.norm()).item() <= tol


def test_wrapper_keeps_leading_dims():
    layout, codes, scale, zero, planes = make((33, 576), 128, (4, 8))
    x = torch.randn(2, 3, 576).to(DEVICE)
    y = triton_nested.nested_linear(x, planes[:1], layout.widths[:1], scale, zero, 4, layout.offset(4), 128)
    flat = run(x.reshape(6, 576), layout, planes, scale, zero, 4)
    assert y.shape == (2, 3, 33) and torch.equal(y.reshape(6, 33), flat)


def test_int8_activation_mode_matches_the_reference():
    from fqcompile.kernels import reference_linear

    layout, codes, scale, zero, planes = make((65, 136), 128, (4, 8))
    x = (torch.randn(5, 136, generator=torch.Generator().manual_seed(1)) + 0.5).to(DEVICE)
    for bits in (4, 8):
        n = layout.planes_for(bits)
        y = triton_nested.nested_linear(x, planes[:n], layout.widths[:n], scale, zero, 4, layout.offset(bits), 128, True)
        cpu = [p.cpu() for p in planes]
        ref = reference_linear(x.cpu().double(), cpu, (layout, scale.cpu(), zero.cpu()), bits, int8_activations=True)
        assert ((y.cpu().double() - ref).norm() / ref.norm()).item() <= 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (scripts/gpu_check.sh)")
def test_cuda_tensors_dispatch_to_triton():
    from fqcompile.kernels import backend, flex_linear

    layout, codes, scale, zero, planes = make((256, 1024), 128, (4, 8))
    planes, scale, zero = [p.cuda() for p in planes], scale.cuda(), zero.cuda()
    x = torch.randn(4, 1024, device="cuda")
    y = flex_linear(x, planes, (layout, scale, zero), 4)
    assert backend(x.device) == "triton"
    ref = flex_linear(x.cpu(), [p.cpu() for p in planes], (layout, scale.cpu(), zero.cpu()), 4)
    assert ((y.cpu() - ref).norm() / ref.norm()).item() <= 1e-5
