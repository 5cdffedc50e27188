"""FlexLinear and the kernel interface against a float64 matmul, at every precision."""

import pytest
import torch

from fqcompile.errors import FqError
from fqcompile.flex_linear import FlexLinear
from fqcompile.formats.nested import ZERO_EXACT, Layout, pack_planes, quantize_rtn
from fqcompile.kernels import flex_linear


def make(shape, group, ladder, seed=0, grid=ZERO_EXACT):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * 0.1
    layout = Layout(*shape, group_size=group, ladder=ladder, grid=grid)
    codes, scale, zero = quantize_rtn(w, group, ladder, grid)
    return layout, codes, scale, zero, pack_planes(codes, layout)


@pytest.mark.parametrize("ladder", [(4, 8), (2, 3, 4, 6, 8)])
@pytest.mark.parametrize("shape,group", [((96, 200), 64), ((33, 576), 128), ((17, 61), 32)])
@pytest.mark.parametrize("batch", [(1,), (3,), (2, 5)])
def test_flex_linear_matches_float64_reference(ladder, shape, group, batch, oracle_weight):
    layout, codes, scale, zero, planes = make(shape, group, ladder, seed=shape[0])
    x = torch.randn(*batch, shape[1], generator=torch.Generator().manual_seed(11))
    for bits in ladder:
        ref = x.double() @ oracle_weight(codes, scale, zero, ladder, bits, group, layout.grid, layout.zero_offset).T
        y = flex_linear(x, planes, (layout, scale, zero), bits)
        assert y.shape == (*batch, shape[0]) and y.dtype == torch.float32
        assert (y.double() - ref).norm() <= 1e-5 * ref.norm()


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_low_precision_activations(dtype, tol, oracle_weight):
    layout, codes, scale, zero, planes = make((64, 256), 128, (4, 8))
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(2))
    for bits in (4, 8):
        ref = x.double() @ oracle_weight(codes, scale, zero, (4, 8), bits, 128, layout.grid, layout.zero_offset).T
        y = flex_linear(x.to(dtype), planes, (layout, scale, zero), bits)
        assert y.dtype == dtype
        assert (y.double() - ref).norm() <= tol * ref.norm()


def test_module_switches_precision_and_keeps_only_given_planes(oracle_weight):
    layout, codes, scale, zero, planes = make((40, 128), 64, (4, 8))
    bias = torch.randn(40, generator=torch.Generator().manual_seed(3))
    full = FlexLinear(layout, planes, scale, zero, bias=bias)
    top_only = FlexLinear(layout, planes[:1], scale, zero, bias=bias)
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(4))
    assert full.precisions == (4, 8) and top_only.precisions == (4,)
    assert full.precision == 8 and top_only.precision == 4
    full.set_precision(4)
    assert torch.equal(full(x), top_only(x))
    full.set_precision(8)
    ref = x.double() @ oracle_weight(codes, scale, zero, (4, 8), 8, 64, layout.grid, layout.zero_offset).T + bias.double()
    assert (full(x).double() - ref).norm() <= 1e-5 * ref.norm()
    with pytest.raises(FqError, match="not available"):
        top_only.set_precision(8)
    with pytest.raises(FqError):
        FlexLinear(layout, [planes[1][:, :-1]], scale, zero)  # wrong plane shape


def test_int8_calls_hold_the_planes_packed_where_the_kernel_applies(oracle_weight):
    """With int8 activations, the first decode-sized call re-lays the planes 8 rows at a time
    (AVX2 builds): the same bytes, nothing else kept; every call at either precision and any
    batch then reads them. Float activations get the nested planes back, bit for bit."""
    from fqcompile.kernels import packs_rows, quantize_activations

    layout, codes, scale, zero, planes = make((72, 256), 64, (4, 8))
    original = [p.clone() for p in planes]
    bias = torch.randn(72, generator=torch.Generator().manual_seed(5))
    layer = FlexLinear(layout, planes, scale, zero, bias=bias)
    layer.int8_activations = True
    for bits in (4, 8, 4):
        layer.set_precision(bits)
        w64 = oracle_weight(codes, scale, zero, (4, 8), bits, 64, layout.grid, layout.zero_offset)
        for rows in (9, 1, 8, 9):  # 9: a prefill-sized batch (first, before anything is packed)
            x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows))
            want = quantize_activations(x).double() @ w64.T + bias.double()
            assert (layer(x).double() - want).norm() <= 1e-5 * want.norm()
    packed = layer.packed(8)
    assert bool(packed) == packs_rows()
    if packed:
        assert layer.plane0 is None and layer.plane1 is None  # no second copy
        assert layer.packed(4)[0] is packed[0]  # the top plane serves both precisions
        assert sum(t.numel() for t in packed[:2]) == sum(p.numel() for p in original)
    layer.int8_activations = False
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(3))
    want = x.double() @ oracle_weight(codes, scale, zero, (4, 8), 4, 64, layout.grid, layout.zero_offset).T + bias.double()
    assert (layer(x).double() - want).norm() <= 1e-5 * want.norm()
    assert layer.packed(4) == [] and all(torch.equal(a, b) for a, b in zip(layer.planes(), original))
    odd_layout, _, odd_scale, odd_zero, odd_planes = make((24, 200), 40, (4, 8))
    odd = FlexLinear(odd_layout, odd_planes, odd_scale, odd_zero)
    odd.int8_activations = True
    odd(torch.randn(1, 200))
    assert odd.packed(8) == [] and odd.plane0 is not None  # 200 columns: not whole activation blocks


