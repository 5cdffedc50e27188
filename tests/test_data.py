"""The data module on real prose, local file formats through `datasets`, and model-sampled text."""

import json

import pytest
import torch

from fqcompile import sources
from fqcompile.calibration.data import load_samples
from fqcompile.sources import encode
from fqcompile.errors import FqError


@pytest.fixture(scope="module")
def tok(smol_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_dir)


def test_bos_is_added_for_smollm2(tok):
    assert tok.bos_token == "<|im_start|>"
    ids = encode(tok, "It is a truth universally acknowledged")
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


def test_austen_split_is_deterministic_and_disjoint(tok, austen):
    calib = load_samples(str(austen), tok, split="calib", seq_len=256)
    evals = load_samples(str(austen), tok, split="eval", seq_len=256)
    assert calib.shape[1] == evals.shape[1] == 256
    assert (calib[:, 0] == tok.bos_token_id).all() and (evals[:, 0] == tok.bos_token_id).all()
    total = len(calib) + len(evals)
    assert total > 2000 and abs(len(evals) - 0.25 * total) <= 1  # ~3 MB of prose
    assert not {tuple(r) for r in calib[:, 1:].tolist()} & {tuple(r) for r in evals[:, 1:].tolist()}
    again = load_samples(str(austen), tok, split="eval", seq_len=256, max_samples=5)
    assert torch.equal(again, evals[:5])
    # the text round-trips: the eval part is real English from the novels
    assert "the" in tok.decode(evals[0]).lower().split()


def test_jsonl_and_parquet_and_text_column(tok, tmp_path, austen):
    text = (austen / "emma.txt").read_text()[:40000]
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"id": i, "body": p}) for i, p in enumerate(paragraphs)))
    import datasets

    datasets.Dataset.from_dict({"body": paragraphs, "n": list(range(len(paragraphs)))}).to_parquet(str(tmp_path / "d.parquet"))
    from_jsonl = load_samples(str(jsonl), tok, split="all", seq_len=128, text_column="body")
    from_parquet = load_samples(str(tmp_path / "d.parquet"), tok, split="all", seq_len=128)
    assert len(from_jsonl) > 10 and torch.equal(from_jsonl, from_parquet)
    with pytest.raises(FqError, match="no text column"):
        load_samples(str(jsonl), tok, split="all", seq_len=128, text_column="missing")


def test_bad_datasets_refused(tok, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    short = tmp_path / "short.txt"
    short.write_text("Just a few words.")
    (tmp_path / "folder").mkdir()
    cases = [(empty, "empty|too short|no text"), (short, "too short"), (tmp_path / "folder", "no .txt"),
             (tmp_path / "nope.txt", "not found")]
    for path, message in cases:
        with pytest.raises(FqError, match=message):
            load_samples(str(path), tok, split="calib", seq_len=512)
    with pytest.raises(FqError, match="unknown split"):
        load_samples(str(short), tok, split="train")


def test_self_samples_are_seeded(tiny_dir):
    model, tok, _ = sources.load(str(tiny_dir))
    a = load_samples("self", tok, split="calib", seq_len=12, max_samples=3, model=model, seed=5)
    b = load_samples("self", tok, split="calib", seq_len=12, max_samples=3, model=model, seed=5)
    c = load_samples("self", tok, split="eval", seq_len=12, max_samples=3, model=model, seed=5)
    assert a.shape == (3, 12) and (a[:, 0] == tok.bos_token_id).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len(set(a[:, 1:].flatten().tolist())) > 5  # sampled, not a constant
