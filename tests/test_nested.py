"""Nested-bit quantization: planes round-trip, every slice against a float64 oracle."""

import pytest
import torch

from fqcompile.errors import FqError
from fqcompile.formats.nested import (
    CELL_CENTRE, GRIDS, ZERO_EXACT, Layout, check_ladder, dequantize, pack_planes, plane_widths, quantize_rtn,
    fit_zero_offset, rung_offset, unpack_codes,
)

LADDERS = [(4, 8), (2, 3, 4, 6, 8), (3, 8), (2, 4), (8,), (5, 7)]
SHAPES = [(16, 128), (7, 200), (5, 61), (3, 9)]


def test_ladder_validation():
    assert check_ladder([4, 8]) == (4, 8)
    for bad in ([], [1, 8], [4, 9], [8, 4], [4, 4]):
        with pytest.raises(FqError):
            check_ladder(bad)


def test_plane_widths_are_powers_of_two_summing_to_each_rung():
    assert plane_widths((4, 8)) == (4, 4)
    assert plane_widths((2, 3, 4, 6, 8)) == (2, 1, 1, 2, 2)
    assert plane_widths((3, 8)) == (2, 1, 4, 1)
    for ladder in LADDERS:
        widths = plane_widths(ladder)
        assert all(w in (1, 2, 4, 8) for w in widths)
        cumulative = [sum(widths[: i + 1]) for i in range(len(widths))]
        assert set(ladder) <= set(cumulative) and cumulative[-1] == ladder[-1]


@pytest.mark.parametrize("ladder", LADDERS)
@pytest.mark.parametrize("shape", SHAPES)
def test_planes_round_trip_every_precision(ladder, shape):
    gen = torch.Generator().manual_seed(hash((ladder, shape)) % 2**31)
    layout = Layout(*shape, group_size=32, ladder=ladder)
    codes = torch.randint(0, 2 ** ladder[-1], shape, generator=gen, dtype=torch.uint8)
    planes = pack_planes(codes, layout)
    assert [tuple(p.shape) for p in planes] == [layout.plane_shape(i) for i in range(len(planes))]
    for bits in ladder:
        got = unpack_codes(planes[: layout.planes_for(bits)], layout.widths[: layout.planes_for(bits)])
        assert torch.equal(got[:, : shape[1]].long(), codes.long() >> (ladder[-1] - bits))
        assert not got[:, shape[1] :].any()  # padding holds zero codes


@pytest.mark.parametrize("ladder", LADDERS)
@pytest.mark.parametrize("shape,group", [((24, 256), 128), ((9, 200), 64), ((4, 61), 16), ((6, 40), 128)])
@pytest.mark.parametrize("grid", list(GRIDS))
def test_dequantize_matches_float64_oracle_and_error_bound(ladder, shape, group, grid, oracle_weight):
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(shape, generator=gen) * torch.rand(shape[0], 1, generator=gen)
    w[0, :5] = 0.0  # exact zeros among the weights
    codes, scale, zero = quantize_rtn(w, group, ladder, grid)
    layout = Layout(*shape, group_size=group, ladder=ladder, grid=grid)
    planes = pack_planes(codes, layout)
    g = torch.arange(shape[1]) // group
    for bits in ladder:
        ref = oracle_weight(codes, scale, zero, ladder, bits, group, grid, layout.zero_offset)
        got = dequantize(planes, scale, zero, layout, bits).double()
        assert torch.allclose(got, ref, rtol=1e-6, atol=1e-7 * ref.abs().max().item())
        step = scale.double()[:, g] / 2.0 ** (bits - ladder[0])
        err = (got - w.double()).abs()
        if grid == CELL_CENTRE:  # every weight lies in its cell: at most half a step of this precision
            assert (err <= step / 2 * (1 + 1e-3) + 1e-7).all()
        else:  # 0 is a level of every precision; the codes trade the rungs' errors, near RTN's at each
            assert torch.equal(got[0, :5], torch.zeros(5, dtype=torch.float64))
            assert (err / step).pow(2).mean() < 0.25  # direct RTN: 1/12; a rung one bit above another pays most
            assert (err > step * (1 + 1e-3) + 1e-7).float().mean() < 0.01


def test_lowest_slice_is_exactly_direct_rtn():
    w = torch.randn(64, 300, generator=torch.Generator().manual_seed(3))
    nested = quantize_rtn(w, 128, (4, 8))
    direct = quantize_rtn(w, 128, (4,))
    assert torch.equal(nested[0] >> 4, direct[0])
    assert torch.equal(nested[1], direct[1]) and torch.equal(nested[2], direct[2])


def test_zero_exact_offsets():
    # c_b = c >> (B - b): the b-bit zero point is the top b bits of the master one, z * 2^(B - b0) + c
    assert [rung_offset((3, 4, 6, 8), b, ZERO_EXACT, 21) for b in (3, 4, 6, 8)] == [0, 1, 5, 21]
    assert [rung_offset((4, 8), b, CELL_CENTRE) for b in (4, 8)] == [0, 7.5]
    assert Layout(1, 1, 1, (4, 8), ZERO_EXACT).zero_offset == fit_zero_offset((4, 8))
    with pytest.raises(FqError, match="unknown `grid`"):
        rung_offset((4, 8), 8, "centre")
    with pytest.raises(FqError, match="`zero_offset` 16"):
        Layout(1, 1, 1, (4, 8), ZERO_EXACT, 16)


@pytest.mark.parametrize("grid", list(GRIDS))
def test_zero_group_and_constant_rows(grid):
    w = torch.randn(4, 256, generator=torch.Generator().manual_seed(5))
    w[1, :128] = 0.0  # one all-zero group next to random ones
    w[2] = 0.25  # a constant positive row
    layout = Layout(4, 256, 128, (4, 8), grid)
    codes, scale, zero = quantize_rtn(w, 128, layout.ladder, grid)
    planes = pack_planes(codes, layout)
    assert torch.equal(dequantize(planes, scale, zero, layout, 4)[1, :128], torch.zeros(128))
    for bits in (4, 8):
        deq = dequantize(planes, scale, zero, layout, bits)
        assert deq[1, :128].abs().max() <= 1e-7
        assert (deq[2] - 0.25).abs().max() <= scale[2].float().max() / 2 ** (bits - 4) / 2


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_refused(bad):
    w = torch.randn(4, 64)
    w[2, 5] = bad
    with pytest.raises(FqError, match="NaN or Inf"):
        quantize_rtn(w, 32, (4, 8))


def test_precision_outside_ladder_refused():
    with pytest.raises(FqError, match="not in the ladder"):
        Layout(4, 64, 32, (4, 8)).planes_for(6)


def test_every_rungs_scale_is_an_fp16_number():
    """group_grid rounds through the top rung's step, so s / 2^(B - b0) survives fp16 even for tiny
    ranges (a GPTQ export stores each rung's scale in fp16); normal ranges keep the plain rounding."""
    from fqcompile.formats.nested import group_grid

    torch.manual_seed(0)
    spans = torch.cat([torch.rand(64) * 1e-3 + 1e-5, torch.rand(64) * 0.5 + 0.02])  # tiny and normal ranges
    wmin = -spans * torch.rand(128)
    wmax = wmin + spans
    scale, zero = group_grid(wmin, wmax, 4, 8)
    top = scale.float() / 16
    assert torch.equal(top.half().float(), top)
    assert (scale.float() * 15 >= (wmax.clamp(min=0) - wmin.clamp(max=0)) * (1 - 1e-6)).all()  # still spans the range
    plain, _ = group_grid(wmin, wmax, 4)
    assert not torch.equal(plain[:64].float() / 16, plain[:64].float().div(16).half().float())  # what it fixes
    assert torch.equal(scale[64:], plain[64:])
