"""Text in: one place that turns a dataset spec into fixed-length token samples.

Sources: a `datasets` hub name (`name` or `name:config`), local .txt/.jsonl/.json/.parquet
files or folders of them, or `self` (text sampled from the model, seeded). Documents are
tokenized, concatenated and cut into windows of `seq_len` tokens, each starting with the
BOS token. The split is deterministic: the last `eval_fraction` of the windows is the
evaluation part, the rest the calibration part ('self' draws each part with its own seed).
"""

from pathlib import Path

import torch

from fqcompile.errors import FqError
from fqcompile.sources import require_hub

SELF = "self"
SUFFIX_BUILDER = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SPLITS = ("calib", "eval", "all")


def load_texts(source: str, text_column: str | None = None) -> list[str]:
    """Documents of a local path or a hub dataset, in a fixed order."""
    import datasets

    path = Path(source).expanduser()
    if path.exists():
        files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIX_BUILDER) if path.is_dir() else [path]
        if not files:
            raise FqError(f"no .txt/.jsonl/.json/.parquet files in {source}")
        builders = {SUFFIX_BUILDER.get(f.suffix) for f in files}
        if None in builders or len(builders) > 1:
            raise FqError(f"dataset files must all be one of .txt, .jsonl/.json, .parquet: {source}")
        builder = builders.pop()
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        try:
            ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", **kwargs)
        except Exception as exc:  # datasets raises many types for unreadable files
            raise FqError(f"cannot read dataset {source}: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None
    elif path.suffix in SUFFIX_BUILDER or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise FqError(f"dataset not found: {source}")
    else:
        name, _, config = source.partition(":")
        require_hub(f"dataset '{source}'")
        try:
            ds = datasets.load_dataset(name, config or None, split="train")
        except Exception as exc:
            raise FqError(f"cannot load dataset '{source}': {str(exc).splitlines()[0]}") from None
    return _column(ds, text_column, source)


def _column(ds, text_column: str | None, source: str) -> list[str]:
    string_columns = [c for c, f in ds.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
    column = text_column or ("text" if "text" in string_columns else (string_columns or [None])[0])
    if column not in string_columns:
        raise FqError(f"dataset {source} has no text column '{column}' (text columns: {', '.join(string_columns) or 'none'})")
    return [t for t in ds[column] if t and t.strip()]


def windows(token_ids: list[int], seq_len: int, bos: int | None) -> torch.Tensor:
    """Cut a token stream into [n, seq_len] windows, each prefixed with BOS."""
    body = seq_len - 1 if bos is not None else seq_len
    n = len(token_ids) // body
    out = torch.tensor(token_ids[: n * body], dtype=torch.long).view(n, body)
    if bos is not None:
        out = torch.cat([torch.full((n, 1), bos, dtype=torch.long), out], dim=1)
    return out


def text_samples(texts: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False).input_ids)
        if tokenizer.eos_token_id is not None:
            stream.append(tokenizer.eos_token_id)  # document boundary
    return windows(stream, seq_len, tokenizer.bos_token_id)


@torch.no_grad()
def self_samples(model, tokenizer, n: int, seq_len: int, seed: int, batch_size: int = 16) -> torch.Tensor:
    """`n` sequences sampled from the model itself (temperature 1, top-k 50), seeded.

    Needs nothing but the model; EOS is suppressed so every sample is full length.
    """
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        chunks = []
        for start in range(0, n, batch_size):
            rows = min(batch_size, n - start)
            prompt = torch.full((rows, 1), bos, dtype=torch.long)
            out = model.generate(
                prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0, top_k=50,
                top_p=1.0, max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1,
                pad_token_id=tokenizer.eos_token_id,
            )
            chunks.append(out[:, :seq_len])
    finally:
        torch.random.set_rng_state(generator_state)
    return torch.cat(chunks)


def load_samples(
    source: str,
    tokenizer,
    split: str = "calib",
    seq_len: int = 512,
    max_samples: int | None = None,
    eval_fraction: float = 0.25,
    model=None,
    seed: int = 0,
    text_column: str | None = None,
) -> torch.Tensor:
    """[n, seq_len] token samples of one split of `source` (see module doc)."""
    if split not in SPLITS:
        raise FqError(f"unknown split '{split}' (use one of {', '.join(SPLITS)})")
    if seq_len < 2:
        raise FqError(f"sequence length must be at least 2, got {seq_len}")
    if not 0 < eval_fraction < 1:
        raise FqError(f"eval fraction must be between 0 and 1, got {eval_fraction}")
    if source == SELF:
        if model is None:
            raise FqError("dataset 'self' needs a model to sample from")
        n = max_samples or 16
        return self_samples(model, tokenizer, n, seq_len, seed=seed + (1 if split == "eval" else 0))
    samples = text_samples(load_texts(source, text_column), tokenizer, seq_len)
    if len(samples) < (1 if split == "all" else 2):
        raise FqError(
            f"dataset {source} is too short: {len(samples)} sample(s) of {seq_len} tokens "
            f"(need at least 2 to split into calibration and evaluation)"
        )
    n_eval = max(1, round(len(samples) * eval_fraction))
    part = {"calib": samples[: len(samples) - n_eval], "eval": samples[len(samples) - n_eval :], "all": samples}[split]
    return part[:max_samples] if max_samples else part
