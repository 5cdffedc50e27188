"""The `fqcompile` command: real runs of the installed command (from the checkout and from
elsewhere), JSON outputs, and one-line refusals of bad input (in-process, through typer's
CliRunner, and through the installed command)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fqcompile.cli import app
from fqcompile.formats import checkpoint as ckpt
from fqcompile.processes import python_command

EXE = str(Path(sys.executable).with_name("fqcompile"))  # the one installed beside this Python
REPO = Path(__file__).resolve().parents[1]
# a closed local port stands in for the hub, so the "no network" case holds with or without one
ENV = {"FQCOMPILE_DEBUG": "", "HF_ENDPOINT": "http://127.0.0.1:9"}


def run(*args, cwd=REPO):
    return subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, env=dict(os.environ, **ENV),
                          cwd=cwd, timeout=300)


def invoke(*args):
    """The CLI in this process; the result has returncode, stdout and stderr like a subprocess's."""
    result = CliRunner().invoke(app, [str(a) for a in args], env=ENV)
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def assert_refused(result, message):
    """Non-zero exit, exactly one line on stderr containing `message`, no traceback."""
    assert result.returncode != 0, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def test_child_processes_never_import_the_checkout_folders():
    """Started from the checkout, a child of ours must not see kernels/ as the top-level `kernels`
    (transformers imports that name; with transformers 5.25 it broke `fqcompile bench`)."""
    probe = "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s and s.origin else '-')"
    plain = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert Path(plain.stdout.strip()).parent == REPO / "kernels"  # the hazard is real without -P
    ours = subprocess.run(python_command("-c", probe), capture_output=True, text=True, cwd=REPO, timeout=60)
    assert ours.returncode == 0, ours.stderr
    origin = ours.stdout.strip()  # nothing, or the PyPI package in site-packages
    assert origin == "-" or "site-packages" in Path(origin).parts, origin


def test_help_and_refusals_import_no_heavy_library(tiny_ckpt):
    """`fqcompile --help` and argument errors answer without importing transformers or datasets."""
    code = ("import sys\nfrom fqcompile.cli import main\nsys.argv = ['fqcompile', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('transformers', 'datasets', 'torch') if m in sys.modules))")
    for args, heavy in ((["--help"], "[]"), (["export", "--help"], "[]"), (["frobnicate"], "[]"),
                        (["export", "--out", "x", "--ladder", "four"], "['torch']"),
                        (["eval", str(tiny_ckpt), "--precision", "3", "--no-reference"], "['torch']")):
        out = subprocess.run(python_command("-c", code, *args), capture_output=True, text=True, cwd=REPO, timeout=120)
        assert out.stdout.strip().splitlines()[-1] == heavy, (args, out.stdout, out.stderr)


def test_inspect_and_json(tiny_ckpt, tmp_path):
    out = invoke("inspect", tiny_ckpt, "--verify", "--json", tmp_path / "i.json")
    assert out.returncode == 0, out.stderr
    assert "SHA-256 verified" in out.stdout and "plane-1.safetensors" in out.stdout
    assert "group size 32 does not divide in_features [72, 196]" in out.stdout  # ragged last groups, said
    data = json.loads((tmp_path / "i.json").read_text())
    assert data["ladder"] == [4, 8] and data["verified_sha256"] is True
    assert set(data["precisions"]) == {"4", "8"}
    assert data["precisions"]["4"]["quantized_bytes"] < data["precisions"]["8"]["quantized_bytes"]


def test_generate_streams_and_reports(tiny_ckpt, tmp_path):
    out = invoke("generate", tiny_ckpt, "--prompt", "Hello", "--precision", "4", "--max-new-tokens", "6",
              "--temperature", "0.8", "--top-p", "0.9", "--seed", "3", "--json", tmp_path / "g.json")
    assert out.returncode == 0, out.stderr
    data = json.loads((tmp_path / "g.json").read_text())
    assert data["new_tokens"] == 6 and data["precision"] == 4 and data["tokens_per_s"] > 0
    assert data["text"].strip() and data["text"].strip() in out.stdout  # streamed to stdout
    assert "tokens/s" in out.stderr


def test_generate_engines_agree_greedy(tiny_ckpt, tmp_path):
    texts = {}
    for engine in ("slim", "hf"):
        out = invoke("generate", tiny_ckpt, "--prompt", "Hello there", "--prompt", "A", "--precision", "8",
                  "--max-new-tokens", "8", "--engine", engine, "--json", tmp_path / f"{engine}.json")
        assert out.returncode == 0, out.stderr
        assert f"engine {engine}" in out.stderr
        texts[engine] = json.loads((tmp_path / f"{engine}.json").read_text())["text"]
    assert texts["slim"] == texts["hf"] and len(texts["slim"]) == 2


def test_bench_reports_every_policy_and_the_baseline(tiny_ckpt, tmp_path):
    out = run("bench", tiny_ckpt, "--new-tokens", "4", "--prompt-tokens", "8", "--json", tmp_path / "b.json")  # checkout
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    fast = ", 8-bit head, int8 activations"  # the default serving options
    assert [r["policy"] for r in rows] == [f"static:4{fast}", f"static:8{fast}", "HF eager bfloat16"]
    assert all(r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0 for r in rows)
    assert rows[0]["engine"] == "slim" and rows[0]["avg_bits_read"] < rows[1]["avg_bits_read"]
    assert f"| static:4{fast} | slim |" in out.stdout


def test_bench_runs_from_any_folder(tiny_ckpt, tmp_path):
    out = run("bench", tiny_ckpt, "--policy", "static:8", "--new-tokens", "4", "--prompt-tokens", "8", "--no-baseline",
              "--json", tmp_path / "b.json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    (row,) = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert row["policy"].startswith("static:8") and row["decode_tokens_per_s"] > 0


def test_bench_compares_checkpoints_in_the_same_turns(tiny_dir, tiny_ckpt, tmp_path):
    import fqcompile

    v2 = fqcompile.export(str(tiny_dir), tmp_path / "v2", ladder=(4, 8), group_size=32, grid="zero-exact",
                          progress=False)
    out = run("bench", tiny_ckpt, "--compare", v2, "--policy", "static:4", "--new-tokens", "4", "--prompt-tokens", "8",
              "--no-baseline", "--json", tmp_path / "b.json")
    assert out.returncode == 0, out.stderr
    data = json.loads((tmp_path / "b.json").read_text())
    assert [r["policy"].split(" [")[1] for r in data["rows"]] == [f"{tiny_ckpt.name}]", "v2]"]
    assert data["compare"] == [str(v2)] and all(r["decode_tokens_per_s"] > 0 for r in data["rows"])
    bad = invoke("bench", tiny_ckpt, "--compare", tmp_path / "nothing", "--no-baseline")
    assert bad.returncode != 0 and "checkpoint folder not found" in bad.stderr


def test_bench_repeats_report_medians(tiny_ckpt, tmp_path):
    out = run("bench", tiny_ckpt, "--policy", "static:4", "--new-tokens", "4", "--prompt-tokens", "8", "--no-baseline",
              "--repeats", "3", "--no-quantized-head", "--no-int8-activations", "--json", tmp_path / "b.json")
    assert out.returncode == 0, out.stderr
    data = json.loads((tmp_path / "b.json").read_text())
    (row,) = data["rows"]
    assert data["repeats"] == 3 and row["runs"] == 3 and len(row["decode_tokens_per_s_runs"]) == 3
    assert row["decode_tokens_per_s"] == sorted(row["decode_tokens_per_s_runs"])[1]
    assert out.stderr.count("(run ") == 3 and row["policy"] == "static:4"


def test_bench_refuses_a_bad_policy_before_running(tiny_ckpt, tmp_path):
    out = invoke("bench", tiny_ckpt, "--policy", "static:5", "--no-baseline", "--json", tmp_path / "b.json")
    assert out.returncode == 2 and out.stderr.strip().splitlines() == ["error: precision 5 is not in the ladder [4, 8]"]
    assert not (tmp_path / "b.json").exists()


def test_eval_json_on_local_text(tiny_dir, tiny_ckpt, tmp_path, austen):
    out = invoke("eval", tiny_ckpt, "--dataset", austen / "emma.txt", "--samples", "2", "--seq-len", "64",
              "--reference", tiny_dir, "--json", tmp_path / "e.json")
    assert out.returncode == 0, out.stderr
    data = json.loads((tmp_path / "e.json").read_text())
    rows = data["results"]
    assert set(rows) == {"fp", "4", "8"} and rows["8"]["tokens"] == 2 * 63
    assert 0 <= rows["8"]["kl"] < rows["4"]["kl"]
    assert rows["4"]["bits_per_weight"] < rows["8"]["bits_per_weight"]


def test_eval_defaults_to_the_fast_options_at_little_cost(tiny_ckpt, tmp_path, austen):
    args = ("eval", tiny_ckpt, "--dataset", austen / "emma.txt", "--samples", "2", "--seq-len", "64",
            "--no-reference", "--precision", "8")
    exact = invoke(*args, "--no-int8-activations", "--no-quantized-head", "--json", tmp_path / "a.json")
    default = invoke(*args, "--json", tmp_path / "b.json")
    assert exact.returncode == 0 and default.returncode == 0, default.stderr
    assert "options: 8-bit head, int8 activations" in default.stdout
    assert "options: float head and activations" in exact.stdout
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a["options"] == {"quantized_head": False, "int8_activations": False}
    assert b["options"] == {"quantized_head": True, "int8_activations": True}
    a, b = a["results"]["8"]["perplexity"], b["results"]["8"]["perplexity"]
    assert a != b and abs(b / a - 1) < 0.02


def test_eval_checkpoint_without_reachable_source_still_reports_perplexity(tiny_ckpt, tmp_path, austen):
    # the manifest names the tiny model's temporary folder as source; point it somewhere gone
    manifest = json.loads((tiny_ckpt / ckpt.MANIFEST).read_text())
    copy = tmp_path / "moved"
    shutil.copytree(tiny_ckpt, copy)
    manifest["source"]["model"] = str(tmp_path / "gone")
    (copy / ckpt.MANIFEST).write_text(json.dumps(manifest))
    out = invoke("eval", copy, "--dataset", austen / "emma.txt", "--samples", "1", "--seq-len", "32", "--precision", "4",
              "--json", tmp_path / "e.json")
    assert out.returncode == 0, out.stderr
    assert "KL not reported" in out.stderr
    data = json.loads((tmp_path / "e.json").read_text())
    assert data["reference"] is None and data["results"]["4"]["kl"] is None


@pytest.fixture
def damaged(ckpt_copy):
    path = ckpt_copy / "plane-1.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    return ckpt_copy


def test_bad_input_is_refused_in_one_line(tiny_dir, tiny_ckpt, damaged, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    no_config = tmp_path / "no-config"
    no_config.mkdir()
    (tmp_path / "nums.jsonl").write_text('{"n": 1, "text": "a"}\n{"n": 2, "text": "b"}\n')
    unreadable_gguf = tmp_path / "broken.gguf"
    unreadable_gguf.write_bytes(b"not a gguf file at all")
    cases = [
        (("export", "--out", tmp_path / "a", "--model", tmp_path / "missing"), "model not found"),
        (("export", "--out", tmp_path / "a", "--model", "someorg/somemodel"), "cannot be reached"),
        (("export", "--out", tmp_path / "a", "--model", no_config), "no config.json"),
        (("export", "--out", tmp_path / "a", "--model", unreadable_gguf), "cannot read GGUF"),
        (("export", "--out", tmp_path / "a", "--model", tiny_dir, "--ladder", "4,10"), "between 2 and 8"),
        (("export", "--out", tmp_path / "a", "--model", tiny_dir, "--ladder", "8,4"), "strictly increasing"),
        (("export", "--out", tmp_path / "a", "--model", tiny_dir, "--ladder", "four"), "comma-separated"),
        (("export", "--out", tmp_path / "a", "--model", tiny_dir, "--group-size", "0"), "positive"),
        (("export", "--out", tiny_ckpt, "--model", tiny_dir), "already exists"),
        (("export", "--model", tiny_dir), "Missing option"),
        (("inspect", tmp_path), "not an fqcompile checkpoint"),
        (("inspect", damaged), "truncated"),
        (("generate", damaged, "--prompt", "x"), "truncated"),
        (("generate", tiny_ckpt, "--prompt", "x", "--precision", "6"), "not in the ladder"),
        (("eval", tiny_ckpt, "--dataset", empty, "--no-reference"), "too short"),
        (("eval", tiny_ckpt, "--dataset", tmp_path / "nothing.txt", "--no-reference"), "dataset not found"),
        (("eval", tiny_ckpt, "--precision", "3", "--no-reference"), "not in the ladder"),
        (("frobnicate",), "No such command"),
        (("calibrate", "--out", tmp_path / "cal", "--model", tiny_dir, "--target-bits", "3"), "below the lowest"),
        (("calibrate", "--out", tmp_path / "cal", "--model", tiny_dir, "--max-ppl-increase", "lots"), "percentage"),
        (("calibrate", "--out", tmp_path / "cal", "--model", tiny_dir, "--unit", "head"), "unit must be"),
        (("calibrate", "--out", tmp_path / "cal", "--model", tiny_dir, "--ladder", "8"), "at least two"),
        (("export", "--out", tmp_path / "a", "--model", tiny_dir, "--calib", tmp_path), "not a finished calibration"),
        (("inspect", tiny_ckpt, "--json", tmp_path / "no" / "such" / "dir.json"), "cannot write --json"),
        (("export", "--out", tmp_path / "a", "--model", tiny_dir, "--method", "gptq"), "needs calibration text"),
        (("export", "--out", tmp_path / "a", "--model", tiny_dir, "--method", "awq"), "unknown method"),
        (("export", "--out", tmp_path / "a", "--model", tiny_dir, "--dataset", "self", "--rung-weights", "6:1"),
         "rungs of the ladder"),
        (("export", "--out", tmp_path / "a", "--model", tiny_dir, "--dataset", "self", "--rung-weights", "4=1"),
         "rung weights must look like"),
        (("export", "--out", tmp_path / "a", "--model", tiny_dir, "--dataset", "self", "--damp", "0"), "damping"),
        (("export", "--out", tmp_path / "a", "--model", tiny_dir, "--dataset", "self", "--propagate", "6"),
         "not in the ladder"),
        (("export", "--out", tmp_path / "a", "--model", tiny_dir, "--dataset", "self", "--samples", "0"),
         "at least 1 calibration sample"),
        (("eval", tiny_ckpt, "--dataset", tmp_path / "nums.jsonl", "--text-column", "n", "--no-reference"),
         "no text column"),
    ]
    for args, message in cases:
        assert_refused(invoke(*args), message)
    assert not (tmp_path / "a").exists()
    for args, message in cases[:1] + cases[9:11]:  # the installed command says the same, from anywhere
        assert_refused(run(*args, cwd=tmp_path), message)


def test_export_gptq_from_the_command_line(tiny_dir, austen, tmp_path):
    out = tmp_path / "g"
    result = invoke("export", "--out", out, "--model", tiny_dir, "--group-size", "32", "--dataset", austen,
                 "--samples", "4", "--seq-len", "32", "--no-act-order", "--no-true-sequential", "--rung-weights",
                 "8:0.5")
    assert result.returncode == 0, result.stderr
    assert "gptq        4 x 32 tokens" in result.stdout and "act-order off, true-sequential off" in result.stdout
    assert "memory      peak" in result.stdout
    manifest = json.loads((out / "fqcompile.json").read_text())
    assert manifest["quantizer"]["rung_weights"] == {"4": 1.0, "8": 0.5}
    assert manifest["quantizer"]["true_sequential"] is False
    assert "gptq-log.json" in manifest["files"]
    assert invoke("inspect", out, "--verify").returncode == 0


def test_library_errors_name_parameters_and_the_cli_says_flags(tiny_dir, tiny_ckpt):
    import fqcompile
    from fqcompile.cli_options import as_flags

    with pytest.raises(fqcompile.FqError, match=r"use `force=True` to overwrite"):
        fqcompile.export(str(tiny_dir), tiny_ckpt)
    with pytest.raises(fqcompile.FqError, match=r"`method='gptq'` needs calibration text: pass `dataset`"):
        fqcompile.export(str(tiny_dir), tiny_ckpt.parent / "new", method="gptq")
    assert_refused(invoke("export", "--out", tiny_ckpt, "--model", tiny_dir), "(use --force to overwrite it)")
    assert_refused(invoke("export", "--out", tiny_ckpt.parent / "new", "--model", tiny_dir, "--method", "gptq"),
                   "--method gptq needs calibration text: pass --dataset")
    assert as_flags("use `engine='hf'`, set `seq_len=64` or `true_sequential`; keep `pip install x`") == \
        "use --engine hf, set --seq-len 64 or --true-sequential; keep `pip install x`"
