"""The checkpoint folder: file names, the manifest, hashing and verification.

See docs/format.md for the full description. Everything here is plain JSON and
safetensors: nothing that executes code when loaded.
"""

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fqcompile.errors import FqError
from fqcompile.formats.nested import GRIDS, Layout, check_ladder, dequantize, plane_widths

FORMAT = "fqcompile-nested"
FORMAT_VERSIONS = tuple(sorted(set(GRIDS.values())))  # what this fqcompile reads; a grid sets the version
MANIFEST = "fqcompile.json"
POLICY = "policy.json"
DENSE = "dense.safetensors"
META = "meta.safetensors"


def plane_file(index: int) -> str:
    return f"plane-{index}.safetensors"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], **metadata: str) -> None:
    # safetensors writes metadata keys in hash order: more than one key makes the bytes
    # differ between runs, so callers pass at most one.
    assert len(metadata) <= 1, "one metadata key at most (deterministic output)"
    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(path), metadata=metadata or None)


def write_manifest(folder: Path, manifest: dict) -> None:
    """Hash every file in `folder` into the manifest and write it (last)."""
    manifest = dict(manifest, format=FORMAT, format_version=GRIDS[manifest["grid"]])
    manifest["files"] = {
        p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def read_manifest(folder: Path) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise FqError(f"checkpoint folder not found: {folder}")
    path = folder / MANIFEST
    if not path.is_file():
        raise FqError(f"{folder} is not an fqcompile checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise FqError(f"{path}: not an {FORMAT} manifest")
        version = manifest.get("format_version")
        if version not in FORMAT_VERSIONS:
            raise FqError(
                f"{folder}: checkpoint format version {version} is not supported "
                f"(this fqcompile reads versions {', '.join(map(str, FORMAT_VERSIONS))})"
            )
        ladder = check_ladder(manifest["ladder"])
        if int(manifest["group_size"]) < 1:
            raise ValueError(f"group_size {manifest['group_size']}")
        if manifest["master_bits"] != ladder[-1] or tuple(manifest["plane_widths"]) != plane_widths(ladder):
            raise ValueError("master_bits/plane_widths disagree with the ladder")
        if manifest["plane_layout"] != "row-segments" or GRIDS.get(manifest["grid"]) != version:
            raise ValueError(f"unknown plane layout or grid {manifest['plane_layout']}/{manifest['grid']} "
                             f"for format version {version}")
        if version > 1 and not isinstance(manifest["zero_offset"], int):
            raise ValueError(f"`zero_offset` {manifest['zero_offset']!r}")
        try:  # an offset outside the grid
            Layout(1, 1, 1, ladder, manifest["grid"], manifest.get("zero_offset", 0))
        except FqError as exc:
            raise ValueError(str(exc)) from None
        for info in manifest["modules"].values():
            out_features, in_features = (int(n) for n in info["shape"])
            if out_features < 1 or in_features < 1:
                raise ValueError(f"shape {info['shape']}")
        required = [DENSE, META] + [plane_file(i) for i in range(len(manifest["plane_widths"]))]
        for name in required:
            entry = manifest["files"][name]
            if not isinstance(entry["bytes"], int) or not isinstance(entry["sha256"], str):
                raise ValueError(f"file entry {name}")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FqError(f"{path} is malformed ({type(exc).__name__}: {exc})") from None
    return manifest


def slices_fingerprint(manifest: dict) -> str:
    """Identity of the weights a checkpoint serves: a SHA-256 over its planes' and scales' hashes."""
    names = [META] + [plane_file(i) for i in range(len(manifest["plane_widths"]))]
    return hashlib.sha256("".join(manifest["files"][n]["sha256"] for n in names).encode()).hexdigest()


def slice_reader(folder, dtype=torch.float32):
    """slice_of(module name, bits) -> dense weight: the slices a checkpoint serves (GPTQ's included)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    names = [plane_file(i) for i in range(len(manifest["plane_widths"]))]
    verify(folder, manifest, [META] + names)
    shapes, meta = layouts(manifest), load_tensors(folder / META)
    planes = [load_tensors(folder / name) for name in names]

    def slice_of(name: str, bits: int) -> torch.Tensor:
        return dequantize([p[name] for p in planes], meta[f"{name}.scale"], meta[f"{name}.zero"], shapes[name], bits,
                          dtype)

    return slice_of


def install_policy(folder: Path, policy: dict) -> None:
    """Replace the checkpoint's policy.json and re-hash it in the manifest.

    Each file is written beside and renamed; a process killed between the two renames
    leaves a policy whose hash the manifest does not hold, which `verify` reports.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    tmp = folder / f".{POLICY}.partial"
    tmp.write_text(json.dumps(policy, indent=1) + "\n")
    manifest["files"][POLICY] = {"bytes": tmp.stat().st_size, "sha256": sha256(tmp)}
    tmp_manifest = folder / f".{MANIFEST}.partial"
    tmp_manifest.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    tmp.replace(folder / POLICY)
    tmp_manifest.replace(folder / MANIFEST)


def layouts(manifest: dict) -> dict[str, Layout]:
    ladder, group = tuple(manifest["ladder"]), int(manifest["group_size"])
    return {
        name: Layout(info["shape"][0], info["shape"][1], group, ladder, manifest["grid"], manifest.get("zero_offset", 0))
        for name, info in manifest["modules"].items()
    }


def files_for(manifest: dict, precision: int) -> list[str]:
    """The files a load at `precision` reads: everything but the planes below it."""
    needed = next(iter(layouts(manifest).values())).planes_for(precision) if manifest["modules"] else 0
    unused = {plane_file(i) for i in range(needed, len(manifest["plane_widths"]))}
    return [name for name in manifest["files"] if name not in unused]


def verify(folder: Path, manifest: dict, names=None, hashes: bool = True) -> None:
    """Check that files exist with the recorded size (and SHA-256 unless hashes=False)."""
    folder = Path(folder)
    for name in names if names is not None else manifest["files"]:
        entry, path = manifest["files"][name], folder / name
        if not path.is_file():
            raise FqError(f"checkpoint {folder} is missing {name}")
        if path.stat().st_size != entry["bytes"]:
            raise FqError(f"checkpoint file {name} has {path.stat().st_size} bytes, expected {entry['bytes']} (truncated?)")
        if hashes and sha256(path) != entry["sha256"]:
            raise FqError(f"checkpoint file {name} does not match its SHA-256 in {MANIFEST} (altered or corrupted)")


def load_tensors(path: Path, names=None) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file (only `names`, if given: the rest is never read).

    Copies, not views: safetensors maps the whole file, and one live view keeps every page
    read from it resident (a loaded model's dropped fp32 head or replaced planes stayed in RSS).
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k).clone() for k in (names if names is not None else f.keys())}
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise FqError(f"cannot read {path}: {exc}") from None


def precision_stats(manifest: dict) -> dict[int, dict]:
    """Per ladder precision: bits read per weight, quantized bytes read, bytes resident.

    Bits read per weight counts the planes the precision needs (row padding included)
    plus each group's fp16 scale and uint8 zero, over the quantized weights.
    """
    dense = manifest["files"].get(DENSE, {}).get("bytes", 0)
    out = {}
    for bits in manifest["ladder"]:
        read = weights = 0
        for layout in layouts(manifest).values():
            read += bytes_read(layout, bits)
            weights += layout.out_features * layout.in_features
        out[bits] = {
            "bits_per_weight": 8 * read / weights if weights else 0.0,
            "quantized_bytes": read,
            "resident_bytes": read + dense,
        }
    return out


def bytes_read(layout: Layout, bits: int) -> int:
    """Bytes a b-bit use of one layer reads: its planes (row padding included), fp16 scales, uint8 zeros."""
    width = sum(layout.widths[: layout.planes_for(bits)])
    return layout.out_features * (layout.padded_in * width // 8 + layout.n_groups * 3)
