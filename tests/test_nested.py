"""Nested-bit quantization: planes round-trip, every slice against a float64 oracle."""

import pytest
import torch

from fqcompile.errors import FqError
from fqcompile.formats.nested import (
    Layout, check_ladder, dequantize, pack_planes, plane_widths, quantize_rtn, unpack_codes,
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
def test_dequantize_matches_float64_oracle_and_error_bound(ladder, shape, group, oracle_weight):
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(shape, generator=gen) * torch.rand(shape[0], 1, generator=gen)
    codes, scale, zero = quantize_rtn(w, group, ladder)
    layout = Layout(*shape, group_size=group, ladder=ladder)
    planes = pack_planes(codes, layout)
    g = torch.arange(shape[1]) // group
    for bits in ladder:
        ref = oracle_weight(codes, scale, zero, ladder, bits, group)
        got = dequantize(planes, scale, zero, layout, bits).double()
        assert torch.allclose(got, ref, rtol=1e-6, atol=1e-7 * ref.abs().max().item())
        # every weight lies in its cell, so the error is at most half a step of this precision
        step = scale.double()[:, g] / 2.0 ** (bits - ladder[0])
        assert ((got - w.double()).abs() <= step / 2 * (1 + 1e-3) + 1e-7).all()


def test_lowest_slice_is_exactly_direct_rtn():
    w = torch.randn(64, 300, generator=torch.Generator().manual_seed(3))
    nested = quantize_rtn(w, 128, (4, 8))
    direct = quantize_rtn(w, 128, (4,))
    assert torch.equal(nested[0] >> 4, direct[0])
    assert torch.equal(nested[1], direct[1]) and torch.equal(nested[2], direct[2])


def test_zero_group_and_constant_rows():
    w = torch.randn(4, 256, generator=torch.Generator().manual_seed(5))
    w[1, :128] = 0.0  # one all-zero group next to random ones
    w[2] = 0.25  # a constant positive row
    layout = Layout(4, 256, 128, (4, 8))
    codes, scale, zero = quantize_rtn(w, 128, layout.ladder)
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
