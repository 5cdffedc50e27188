"""The CPU kernels behind flex_linear: the C++ fast path, its variants, the op, the fallback."""

import os
import subprocess
import time

import pytest
import torch

from fqcompile.flex_linear import FlexLinear
from fqcompile.formats.nested import GRIDS, ZERO_EXACT, Layout, pack_planes, quantize_rtn
from fqcompile.kernels import backend, cpu, flex_linear
from fqcompile.files import cache_dir
from fqcompile.processes import python_command

LADDERS = [(4, 8), (2, 3, 4, 6, 8), (3, 8), (8,), (4,)]
# 4096 and 1536: the wide nibble path (half a row is whole groups); 576 with group 128 and
# 200, 61: the general path (groups straddle the halves, rows not a multiple of 8). 33 and 22
# rows of 576: the 576-wide decode path takes rows 4, 2 and 1 at a time (blocks of 16 per thread).
SHAPES = [((96, 4096), 128), ((70, 1536), 64), ((33, 576), 128), ((22, 576), 128), ((40, 200), 64), ((17, 61), 32)]
BATCHES = (1, 2, 3, 5, 8, 9, 33)  # up to 8: per-row dot products; above: dequantized tiles + matmul


def make(shape, group, ladder, seed=0, grid=ZERO_EXACT):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * 0.05
    layout = Layout(*shape, group_size=group, ladder=ladder, grid=grid)
    codes, scale, zero = quantize_rtn(w, group, ladder, grid)
    return layout, codes, scale, zero, pack_planes(codes, layout)


def test_compiled_kernels_serve_the_cpu():
    assert backend(torch.device("cpu")) == "cpu-cpp"


@pytest.mark.parametrize("ladder", LADDERS)
@pytest.mark.parametrize("shape,group", SHAPES)
@pytest.mark.parametrize("grid", list(GRIDS))
def test_cpu_kernel_matches_float64(ladder, shape, group, grid, oracle_weight):
    layout, codes, scale, zero, planes = make(shape, group, ladder, seed=shape[0], grid=grid)
    gen = torch.Generator().manual_seed(7)
    for m in BATCHES:
        # A large mean in the activations stresses the zero-point correction (cancellation).
        for offset in (0.0, 2.0):
            x = torch.randn(m, shape[1], generator=gen) + offset
            for bits in ladder:
                w64 = oracle_weight(codes, scale, zero, ladder, bits, group, grid, layout.zero_offset)
                ref = x.double() @ w64.T
                y = flex_linear(x, planes, (layout, scale, zero), bits)
                assert y.dtype == torch.float32 and y.shape == (m, shape[0])
                err = ((y.double() - ref).norm() / ref.norm()).item()
                assert err <= 1e-5, (m, offset, bits, err)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 1e-3)])
@pytest.mark.parametrize("m", [1, 4, 20])
def test_cpu_kernel_low_precision_activations(dtype, tol, m, oracle_weight):
    layout, codes, scale, zero, planes = make((64, 1024), 128, (4, 8))
    x = torch.randn(2, m, 1024, generator=torch.Generator().manual_seed(m)).to(dtype)
    for bits in (4, 8):
        ref = x.double() @ oracle_weight(codes, scale, zero, (4, 8), bits, 128, layout.grid, layout.zero_offset).T
        y = flex_linear(x, planes, (layout, scale, zero), bits)
        assert y.dtype == dtype and y.shape == (2, m, 64)
        assert (y.double() - ref).norm() <= tol * ref.norm()


def test_empty_batch_and_bad_planes():
    layout, _, scale, zero, planes = make((16, 256), 128, (4, 8))
    assert flex_linear(torch.randn(0, 256), planes, (layout, scale, zero), 8).shape == (0, 16)
    with pytest.raises(RuntimeError, match="plane 0 must be"):
        torch.ops.fqcompile.nested_linear(torch.randn(1, 256), [planes[0][:, :-1]], [4], scale, zero, 4, 0.0, 128)
    with pytest.raises(RuntimeError, match="groups"):
        torch.ops.fqcompile.nested_linear(torch.randn(1, 256), planes[:1], [4], scale, zero, 4, 0.0, 64)


def test_torch_compile_traces_the_op():
    layout, _, scale, zero, planes = make((48, 512), 128, (4, 8))
    layer = FlexLinear(layout, planes, scale, zero, bias=torch.randn(48))
    x = torch.randn(3, 512)
    layer.set_precision(4)
    eager = layer(x)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    assert torch.allclose(compiled(x), eager, rtol=0, atol=0)


CHECK = """
import torch
from fqcompile.formats.nested import GRIDS, ZERO_EXACT, Layout, pack_planes, quantize_rtn
from fqcompile.kernels import backend, flex_linear, kernel_args, pack_rows, packed_linear, quantize_activations, reference_linear
worst = 0.0
for shape, group in [((64, 2048), 128), ((48, 1536), 64), ((33, 576), 128), ((17, 61), 32)]:
    for ladder in [(4, 8), (2, 3, 4, 6, 8), (8,)]:
        w = torch.randn(shape) * 0.05
        layout = Layout(*shape, group_size=group, ladder=ladder)
        codes, scale, zero = quantize_rtn(w, group, ladder)
        planes = pack_planes(codes, layout)
        for m in (1, 3, 9):
            x = torch.randn(m, shape[1]) + 1.0
            for bits in ladder:
                y = flex_linear(x, planes, (layout, scale, zero), bits)
                y = flex_linear(x, planes, (layout, scale, zero), bits)
                ref = reference_linear(x.double(), planes, (layout, scale, zero), bits)
                worst = max(worst, ((y.double() - ref).norm() / ref.norm()).item())
                # the int8-activation mode's paths (VNNI, AVX2 or none) compute W x^ exactly too
                y = flex_linear(x, planes, (layout, scale, zero), bits, int8_activations=True)
                ref = reference_linear(quantize_activations(x).double(), planes, (layout, scale, zero), bits)
                worst = max(worst, ((y.double() - ref).norm() / ref.norm()).item())
                packed = pack_rows(*kernel_args(planes, (layout, scale, zero), bits)[:4], shape[1], group)
                if packed and m <= 8:  # the AVX2 build's packed decode kernel
                    y = packed_linear(x, packed, shape[0], ladder[0], layout.offset(bits), group)
                    worst = max(worst, ((y.double() - ref).norm() / ref.norm()).item())
print(backend(torch.device("cpu")), worst)
"""


def run_check(cache, **env):
    """CHECK in a fresh process whose kernel builds live in `cache` (keyed by flags and sources:
    the variant builds in the user's cache are made once, not once per test run)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("FQCOMPILE_", "CXX"))}
    full.update(FQCOMPILE_CACHE=str(cache), **env)
    out = subprocess.run(python_command("-c", CHECK), capture_output=True, text=True, env=full, timeout=600)
    assert out.returncode == 0, out.stderr
    name, worst = out.stdout.split()
    return name, float(worst), [line for line in out.stderr.splitlines() if line.strip()]


@pytest.mark.slow
@pytest.mark.parametrize("flags", ["-mno-avx512f", "-mno-avx512vbmi", "-mno-avx -mno-f16c -mno-fma"],
                         ids=["avx2", "avx512-no-vbmi", "portable"])
def test_instruction_set_variants(flags):
    """The AVX2 and portable builds (what machines without AVX-512 VBMI compile) are exact too, int8 mode included.

    On a CPU without AVX-512 the two AVX-512-less variants are its own build: that one runs."""
    if "-mno-avx512" in flags and "avx512f" not in cpu.cpu_flags().split():
        flags = ""
    name, worst, _ = run_check(cache_dir(), FQCOMPILE_CXXFLAGS=flags)
    assert name == "cpu-cpp" and worst <= 1e-5


@pytest.mark.slow
def test_without_a_compiler_the_reference_runs_and_says_so_once(tmp_path):
    name, worst, stderr = run_check(tmp_path / "cache", CXX=str(tmp_path / "no-such-c++"))
    assert name == "reference" and worst <= 1e-5
    assert len(stderr) == 1 and "fast cpu kernels unavailable" in stderr[0] and "reference" in stderr[0], stderr


@pytest.mark.slow
def test_reference_on_request_without_warning(tmp_path):
    name, worst, stderr = run_check(tmp_path / "cache", FQCOMPILE_KERNELS="reference")
    assert name == "reference" and worst <= 1e-5 and stderr == []


@pytest.mark.parametrize("shape,group", SHAPES[:3] + [((17, 61), 32)])
@pytest.mark.parametrize("ladder", [(4, 8), (2, 3, 4, 6, 8)])
def test_int8_activation_mode_computes_w_times_quantized_x(shape, group, ladder, oracle_weight):
    """The mode's output is W x^ (x^ = quantize_activations(x)) to fp32 accuracy, on every path."""
    from fqcompile.kernels import quantize_activations

    layout, codes, scale, zero, planes = make(shape, group, ladder, seed=1)
    gen = torch.Generator().manual_seed(5)
    for m in (1, 2, 4, 8, 9):
        x = torch.randn(m, shape[1], generator=gen) + 0.5
        xhat = quantize_activations(x).double()
        for bits in ladder:
            w64 = oracle_weight(codes, scale, zero, ladder, bits, group, layout.grid, layout.zero_offset)
            y = flex_linear(x, planes, (layout, scale, zero), bits, int8_activations=True).double()
            want = xhat @ w64.T
            assert (y - want).norm() <= 1e-5 * want.norm(), (m, bits)
            exact = x.double() @ w64.T
            assert 1e-4 * exact.norm() < (y - exact).norm() < 3e-2 * exact.norm()  # approximate, not broken


def packs_here() -> bool:
    """Whether this machine's build has the packed int8 decode kernel (AVX2 without AVX-512)."""
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    return " avx2" in flags and " avx512f" not in flags


@pytest.mark.parametrize("ladder,bits", [((4, 8), 4), ((4, 8), 8), ((8,), 8)], ids=["nibbles", "two-nibbles", "bytes"])
@pytest.mark.parametrize("shape,group", SHAPES[:4] + [((203, 80), 16), ((37, 96), 32)])
def test_packed_rows_compute_w_times_quantized_x(shape, group, ladder, bits, oracle_weight):
    """pack_rows + packed_linear (the AVX2 int8 path) against float64: the decode kernel on
    batches of 1-8 rows, dequantized tiles beyond (bit for bit nested_linear's); unpack_rows
    gives the nested planes back."""
    from fqcompile.kernels import kernel_args, nested_linear, pack_rows, packed_linear, packs_rows, quantize_activations
    from fqcompile.kernels import unpack_rows

    layout, codes, scale, zero, planes = make(shape, group, ladder, seed=3)
    args = kernel_args(planes, (layout, scale, zero), bits)
    packed = pack_rows(*args[:4], shape[1], group)
    assert bool(packed) == packs_here() == packs_rows()
    if not packed:
        pytest.skip("this build's int8 kernels read the nested planes directly")
    assert len(packed) == len(args[0]) + 2
    for codes_packed, plane in zip(packed, args[0]):
        assert codes_packed.numel() >= plane.numel() and torch.equal(unpack_rows(codes_packed, shape[0]), plane)
    w64 = oracle_weight(codes, scale, zero, ladder, bits, group, layout.grid, layout.zero_offset)
    gen = torch.Generator().manual_seed(11)
    for m in (1, 2, 3, 5, 8, 9, 40):
        for offset in (0.0, 2.0):
            x = torch.randn(1, m, shape[1], generator=gen) + offset
            y = packed_linear(x, packed, shape[0], ladder[0], layout.offset(bits), group)
            assert y.shape == (1, m, shape[0]) and y.dtype == torch.float32
            want = quantize_activations(x).double() @ w64.T
            assert ((y.double() - want).norm() / want.norm()).item() <= 1e-5, (m, offset)
            if m > 8:  # prefill: the same tiles as from the nested planes
                assert torch.equal(y, nested_linear(x, *args, True))


@pytest.mark.skipif(not packs_here(), reason="the packed kernel is built for AVX2 machines without AVX-512")
def test_packed_rows_refuse_what_they_cannot_serve():
    from fqcompile.kernels import kernel_args, pack_rows, packed_linear, unpack_rows

    layout, _, scale, zero, planes = make((24, 256), 64, (4, 8))
    args = kernel_args(planes, (layout, scale, zero), 4)[:4]
    packed = pack_rows(*args, 256, 64)
    with pytest.raises(RuntimeError, match="input of 128 columns"):
        packed_linear(torch.randn(1, 128), packed, 24, 4, 0.0, 64)
    with pytest.raises(RuntimeError, match="expected pack_rows' tensors for 32 rows"):
        packed_linear(torch.randn(1, 256), packed, 32, 4, 0.0, 64)
    with pytest.raises(RuntimeError, match="contiguous CPU tensors"):
        packed_linear(torch.randn(1, 256), [packed[0].transpose(0, 1).contiguous().transpose(0, 1), *packed[1:]], 24, 4, 0.0, 64)
    with pytest.raises(RuntimeError, match="expected one plane of pack_rows for 32 rows"):
        unpack_rows(packed[0], 32)
    with pytest.raises(RuntimeError, match="scale .* must be contiguous"):
        pack_rows(args[0], args[1], scale[:, :2], zero, 256, 64)
    odd = make((24, 200), 40, (4, 8))  # 200 columns: not whole activation blocks of 16
    assert pack_rows(*kernel_args(odd[4], odd[:1] + odd[2:4], 4)[:4], 200, 40) == []


def test_quantize_activations_rounds_within_half_a_step():
    from fqcompile.kernels import quantize_activations

    x = torch.randn(3, 300, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 2, 300)
    x[1, 32:48] = 0  # an all-zero block stays zero
    xhat = quantize_activations(x)
    blocks = torch.nn.functional.pad(x, (0, 4)).unflatten(-1, (19, 16)).abs().amax(-1)
    step = (blocks / 127).repeat_interleave(16, dim=-1)[:, :300]
    assert ((xhat - x).abs() <= step / 2 * (1 + 1e-6)).all()
    assert torch.equal(xhat[1, 32:48], torch.zeros(16))
    live = step > 0
    on_grid = xhat[live] / step[live]
    assert (on_grid.round() - on_grid).abs().max() < 1e-3 and on_grid.abs().max() <= 127 + 1e-3


def test_prune_removes_only_long_unused_builds(tmp_path):
    from fqcompile.kernels import cpu

    keep, recent, old, other = (tmp_path / n for n in ("cpu-new", "cpu-recent", "cpu-old", "models"))
    for folder in (keep, recent, old, other):
        folder.mkdir()
        (folder / "lib.so").write_bytes(b"\x7fELF")
    past = time.time() - (cpu.STALE_DAYS + 1) * 86400
    for folder in (keep, old, other):
        os.utime(folder, (past, past))
    cpu.prune(keep)
    assert keep.is_dir() and recent.is_dir() and other.is_dir()  # itself, a build in use, not a build
    assert not old.exists()


def test_one_build_serves_every_copy_of_the_sources(tmp_path, monkeypatch):
    """The build is keyed by the sources' text, not their path: a fresh clone reuses it, an edit does not."""
    from fqcompile.kernels import cpu

    here = cpu.build_dir()
    copies = []
    for path in cpu.SOURCES + cpu.HEADERS:
        copies.append(tmp_path / path.name)
        copies[-1].write_text(path.read_text())
    monkeypatch.setattr(cpu, "SOURCES", copies[:len(cpu.SOURCES)])
    monkeypatch.setattr(cpu, "HEADERS", copies[len(cpu.SOURCES):])
    assert cpu.build_dir() == here
    copies[0].write_text(copies[0].read_text() + "\n// an edit\n")
    assert cpu.build_dir() != here
