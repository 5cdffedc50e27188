"""Calibration mechanics on a small random-weight Llama; the requirement model on crafted tables."""

import json
import os
import shutil

import pytest
import torch

import fqcompile
from fqcompile.calibrator import calibrate
from fqcompile.calibration import policy as pol
from fqcompile.errors import FqError
from fqcompile.formats import checkpoint as ckpt


def small_args(austen, **kw):
    args = dict(dataset=str(austen / "emma.txt"), samples=6, eval_samples=2, seq_len=48, group_size=32,
                buckets=3, batch_size=3, unit="block", signal="entropy")  # the entropy policy's mechanics
    return {**args, **kw}


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory, tiny_dir, austen):
    out = tmp_path_factory.mktemp("calib") / "tiny"
    calibrate(str(tiny_dir), out, progress=False, **small_args(austen))
    return out


def test_outputs_and_policy_fields(calib_dir):
    for name in ("calibration.json", "policy.json", "table.json", "report.md", "sensitivity.png",
                 "predicted_vs_measured.png", "accuracy_vs_bits.png", "reference.safetensors", "baseline.safetensors"):
        assert (calib_dir / name).is_file(), name
    assert sorted(os.listdir(calib_dir / "units")) == ["000.safetensors", "001.safetensors"]
    policy = json.loads((calib_dir / "policy.json").read_text())
    assert policy["kind"] == "dynamic" and policy["ladder"] == [4, 8] and policy["prefill_precision"] == 8
    assert len(policy["plans"]) == len(policy["bucket_edges"]) + 1 == 3
    assert all(len(p) == len(policy["units"]) == 2 and set(p) <= {4, 8} for p in policy["plans"])
    assert sum(u["weight_share"] for u in policy["units"]) == pytest.approx(1.0)
    assert policy["expected"]["avg_bits"] <= 6.0 + 1e-9
    table = json.loads((calib_dir / "table.json").read_text())
    assert len(table["validation"]) == 5 and all(r["measured_kl"] > 0 for r in table["validation"])
    raw = ckpt.load_tensors(calib_dir / "units" / "000.safetensors")
    assert raw["kl_4"].shape == (6, 47) and (raw["kl_4"] >= -1e-6).all()


def test_resume_remeasures_only_missing_units(calib_dir, tiny_dir, austen, tmp_path):
    work = tmp_path / "resume"
    shutil.copytree(calib_dir, work)
    kept = (work / "units" / "000.safetensors").stat().st_mtime_ns
    before = ckpt.load_tensors(work / "units" / "001.safetensors")
    (work / "units" / "001.safetensors").unlink()
    calibrate(str(tiny_dir), work, progress=False, **small_args(austen))
    assert (work / "units" / "000.safetensors").stat().st_mtime_ns == kept
    after = ckpt.load_tensors(work / "units" / "001.safetensors")
    assert torch.allclose(before["kl_4"], after["kl_4"], rtol=1e-5, atol=1e-8)
    # a new target is a refit over the same measurements
    policy = calibrate(str(tiny_dir), work, progress=False, **small_args(austen, target_bits=4.5))
    assert policy["expected"]["avg_bits"] <= 4.5 + 1e-9
    assert (work / "units" / "000.safetensors").stat().st_mtime_ns == kept


def test_refusals_leave_folders_untouched(calib_dir, tiny_dir, austen, tmp_path):
    work = tmp_path / "c"
    shutil.copytree(calib_dir, work)
    snapshot = {p.name: p.stat().st_mtime_ns for p in work.iterdir()}
    with pytest.raises(FqError, match="other settings"):
        calibrate(str(tiny_dir), work, progress=False, **small_args(austen, samples=5))
    with pytest.raises(FqError, match="below the lowest precision"):
        calibrate(str(tiny_dir), work, progress=False, **small_args(austen, target_bits=3))
    assert {p.name: p.stat().st_mtime_ns for p in work.iterdir()} == snapshot
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(FqError, match="too short"):
        calibrate(str(tiny_dir), tmp_path / "new", progress=False, **small_args(austen, dataset=str(empty)))
    assert not (tmp_path / "new").exists()
    (work / "units" / "001.safetensors").write_bytes(b"garbage")
    with pytest.raises(FqError, match="unreadable"):
        calibrate(str(tiny_dir), work, progress=False, **small_args(austen))


def test_export_takes_only_a_matching_calibration(calib_dir, tiny_dir, smol_dir, tmp_path):
    out = fqcompile.export(str(tiny_dir), tmp_path / "ck", ladder=(4, 8), group_size=32, progress=False,
                           calib=calib_dir, samples=8, seq_len=64)  # GPTQ on a little of the calibration's text
    assert json.loads((out / ckpt.POLICY).read_text()) == json.loads((calib_dir / "policy.json").read_text())
    # the calibration's text is there, so GPTQ (on that text) is the default quantizer
    quantizer = ckpt.read_manifest(out)["quantizer"]
    assert quantizer["method"] == "gptq"
    assert quantizer["dataset"] == json.loads((calib_dir / "calibration.json").read_text())["dataset"]
    ckpt.verify(out, ckpt.read_manifest(out))
    # the runtime serves it: its own plan, refits for other targets, and the static-mixed baseline
    from fqcompile.controller import Controller, resolve

    loaded = fqcompile.load(out)
    assert resolve(loaded.policy, loaded.manifest, None).label == "dynamic"
    for spec, most in (("dynamic:4.5", 4.5), ("static-mixed:6", 6.0)):
        plan = resolve(loaded.policy, loaded.manifest, spec)
        shares = torch.tensor([u["weight_share"] for u in loaded.policy["units"]], dtype=torch.float64)
        assert (plan.bits.double() @ shares <= most + 1e-9).all() or spec.startswith("dynamic")
        controller = Controller(loaded.model, loaded.manifest, plan)
        result = fqcompile.generate(loaded, "It was", max_new_tokens=4, controller=controller)
        assert result["controller"]["decode_tokens"] == 3
        controller.close()
    with pytest.raises(FqError, match="ladder"):
        fqcompile.export(str(tiny_dir), tmp_path / "a", ladder=(3, 8), group_size=32, progress=False, calib=calib_dir)
    with pytest.raises(FqError, match="group size"):
        fqcompile.export(str(tiny_dir), tmp_path / "b", ladder=(4, 8), group_size=64, progress=False, calib=calib_dir)
    with pytest.raises(FqError, match="another model"):
        fqcompile.export(str(smol_dir), tmp_path / "c", ladder=(4, 8), group_size=32, progress=False, calib=calib_dir)
    with pytest.raises(FqError, match="measured slices on the lowest-rung grid, not the `grid` zero-exact"):
        fqcompile.export(str(tiny_dir), tmp_path / "d", ladder=(4, 8), group_size=32, grid="zero-exact", progress=False,
                         calib=calib_dir)
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_linear_units(tiny_dir, austen, tmp_path):
    policy = calibrate(str(tiny_dir), tmp_path / "lin", progress=False,
                       **small_args(austen, unit="linear", samples=2, eval_samples=1, seq_len=24, buckets=2,
                                    ladder=(2, 4)))
    names = [u["name"] for u in policy["units"]]
    assert len(names) == 14 and all(u["modules"] == [u["name"]] for u in policy["units"])
    assert names[0] == "model.layers.0.self_attn.q_proj" and names[-1] == "model.layers.1.mlp.down_proj"
    table = json.loads((tmp_path / "lin" / "table.json").read_text())
    assert sum(table["bucket_tokens"]) == 2 * 22  # positions 1..22 of two 24-token samples (23 scored)


def test_plans_follow_the_price_rule():
    ladder = (4, 8)
    # 2 units of equal size, 2 buckets; unit 0 is cheap to lower in bucket 0 only
    dkl = torch.zeros(2, 2, 2, dtype=torch.float64)
    dkl[0, 0] = torch.tensor([0.001, 0.1])
    dkl[1, 0] = torch.tensor([0.05, 0.2])
    shares = torch.tensor([0.5, 0.5], dtype=torch.float64)
    bits = torch.tensor(ladder)
    assert bits[pol.plans(dkl, shares, ladder, 0.0)].tolist() == [[8, 8], [8, 8]]
    # saving 4 bits on half the weights is worth lam * 2 of KL
    assert bits[pol.plans(dkl, shares, ladder, 0.01)].tolist() == [[4, 8], [8, 8]]
    assert bits[pol.plans(dkl, shares, ladder, 0.03)].tolist() == [[4, 4], [8, 8]]
    assert bits[pol.plans(dkl, shares, ladder, 10.0)].tolist() == [[4, 4], [4, 4]]
    base = torch.tensor([0.0001, 0.0002], dtype=torch.float64)
    share = torch.tensor([0.5, 0.5], dtype=torch.float64)
    for target in (4.0, 5.0, 6.0, 7.0, 8.0):
        lam = pol.fit(dkl, base, share, shares, ladder, target_bits=target)
        avg, _ = pol.expected(dkl, base, share, shares, ladder, pol.plans(dkl, shares, ladder, lam))
        assert avg <= target + 1e-9
    lam = pol.fit(dkl, base, share, shares, ladder, max_kl=0.03)
    assert pol.expected(dkl, base, share, shares, ladder, pol.plans(dkl, shares, ladder, lam))[1] <= 0.03
    with pytest.raises(FqError, match="cannot be met"):
        pol.fit(dkl, base, share, shares, ladder, max_kl=0.00001)


def test_signal_is_previous_entropy_and_buckets_are_quantiles():
    ent = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert torch.equal(pol.signal(ent)[0, 1:], torch.tensor([1.0, 2.0, 3.0]))
    assert torch.isnan(pol.signal(ent)[0, 0])
    smooth = pol.signal(ent, smoothing=0.5)[0]
    assert smooth[2].item() == pytest.approx(0.5 * 1 + 0.5 * 2) and smooth[3].item() == pytest.approx(0.5 * 1.5 + 0.5 * 3)
    sig = torch.arange(100, dtype=torch.float64)[None]
    edges = pol.bucket_edges(sig, 4)
    counts = torch.bincount(pol.bucket_of(sig, edges)[0], minlength=4)
    assert counts.tolist() == [25, 25, 25, 25]


@pytest.mark.parametrize("rotated", [False, True])
def test_calibrating_a_checkpoint_measures_the_slices_it_serves(tiny_dir, austen, tmp_path, rotated):
    from safetensors.torch import load_file

    from fqcompile import sources
    from fqcompile.calibration.sensitivity import fake_quantized
    from fqcompile.controller import resolve
    from fqcompile.formats.nested import dequantize

    folder = fqcompile.export(str(tiny_dir), tmp_path / "ck", ladder=(4, 8), group_size=32, grid="zero-exact",
                              dataset=str(austen / "emma.txt"), samples=4, seq_len=32, rotate=rotated, progress=False)
    policy = calibrate(None, tmp_path / "cal", checkpoint=folder, progress=False,
                       **small_args(austen, group_size=64, ladder=(3, 8)))  # the checkpoint's settings win
    manifest = ckpt.read_manifest(folder)
    assert policy["ladder"] == [4, 8] and policy["calibration"]["group_size"] == 32
    assert policy["calibration"]["slices"] == ckpt.slices_fingerprint(manifest)
    assert json.loads((folder / ckpt.POLICY).read_text()) == policy
    ckpt.verify(folder, manifest)  # the manifest holds the new policy's hash
    # the slices measured are the served (GPTQ) ones, not RTN's of the source weights
    loaded = fqcompile.load(folder)
    name = "model.layers.1.mlp.down_proj"
    layer = loaded.model.get_submodule(name)
    served = dequantize(layer.planes(), layer.scale, layer.zero, layer.layout, 4)
    assert torch.equal(ckpt.slice_reader(folder)(name, 4), served)
    if not rotated:
        rtn = fake_quantized(sources.load(str(tiny_dir))[0].get_submodule(name).weight, 32, (4, 8), 4, "zero-exact")
        assert not torch.equal(rtn, served)
    # every unit at 8 bits stays close to full precision: the reference is in the checkpoint's (rotated) basis
    assert load_file(str(tmp_path / "cal" / "baseline.safetensors"))["kl"].mean() < 1e-3
    assert resolve(loaded.policy, loaded.manifest, "dynamic").label == "dynamic"
    other = ckpt.read_manifest(fqcompile.export(str(tiny_dir), tmp_path / "other", ladder=(4, 8), group_size=32,
                                                grid="zero-exact", progress=False))
    with pytest.raises(FqError, match="fitted to other weights than its own: calibrate it again with `checkpoint`"):
        resolve(policy, other, "dynamic")
    with pytest.raises(FqError, match="measured the slices of checkpoint .* fits no other export"):
        fqcompile.export(str(tiny_dir), tmp_path / "new", ladder=(4, 8), group_size=32, grid="zero-exact",
                         calib=tmp_path / "cal", progress=False)
