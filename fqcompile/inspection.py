"""Inspect: what a checkpoint holds (ladder, quantizer, files, bits read per precision)."""

from pathlib import Path

from .formats import checkpoint as ckpt


def mb(n_bytes: float) -> float:
    return n_bytes / 1e6


def summary(folder: Path, verify: bool = False) -> tuple[str, dict]:
    """A checkpoint's description for people (text) and programs (the `inspect --json` schema, docs/json.md).

    Checks every file's presence and size, and with `verify` its SHA-256.
    """
    lines = []
    manifest = ckpt.read_manifest(folder)
    ckpt.verify(folder, manifest, hashes=verify)
    stats = ckpt.precision_stats(manifest)
    layouts = ckpt.layouts(manifest)
    weights = sum(lay.out_features * lay.in_features for lay in layouts.values())
    files = manifest["files"]
    ragged = sorted({lay.in_features for lay in layouts.values() if lay.in_features % lay.group_size})
    src = manifest["source"]
    lines.append(f"checkpoint  {folder}  (format {manifest['format']} v{manifest['format_version']})")
    lines.append(f"source      {src['model']}  ({src['architecture']}, {src['dtype']})")
    lines.append(f"quantizer   {manifest['quantizer']['method']}, group size {manifest['group_size']}, "
                 f"ladder {manifest['ladder']}, planes {manifest['plane_widths']} bits (most significant first)")
    grid = manifest["grid"] + (f" (zero offset {manifest['zero_offset']})" if "zero_offset" in manifest else "")
    rotation = manifest.get("rotation")
    lines.append(f"grid        {grid}; " + (f"rotated ({rotation['kind']}, seed {rotation['seed']})" if rotation
                                              else "not rotated"))
    q = manifest["quantizer"]
    if q["method"] == "gptq":
        rungs = q["rung_weights"]
        weights_text = ",".join(f"{b}:{w:g}" for b, w in rungs.items()) if isinstance(rungs, dict) else rungs
        lines.append(f"gptq        {q['samples']} x {q['seq_len']} tokens of {q['dataset']}, damp {q['damp']}, "
                     f"act-order {'on' if q['act_order'] else 'off'}, true-sequential {'on' if q['true_sequential'] else 'off'}, "
                     f"rung weights {weights_text}, "
                     f"propagate {q['propagate']}; per-layer loss in {q['log']}")
    lines.append(f"quantized   {len(layouts)} linear layers, {weights / 1e6:.1f} M weights; "
                 f"the rest unquantized in {ckpt.DENSE}")
    if ragged:
        lines.append(f"note        group size {manifest['group_size']} does not divide in_features {ragged}: "
                     f"the last group of those rows is shorter")
    lines.append("files")
    for name, entry in sorted(files.items()):
        lines.append(f"  {name:28s} {mb(entry['bytes']):10.2f} MB")
    lines.append(f"  {'total':28s} {mb(sum(e['bytes'] for e in files.values())):10.2f} MB")
    lines.append("precision   bits read/weight   quantized MB   resident MB")
    for bits, s in stats.items():
        lines.append(f"  {bits:<9d} {s['bits_per_weight']:16.3f} {mb(s['quantized_bytes']):14.2f} "
                     f"{mb(s['resident_bytes']):13.2f}")
    lines.append(f"files       {len(files)} present with recorded sizes" + (", SHA-256 verified" if verify else ""))
    return "\n".join(lines), {
        "folder": str(folder),
        "format_version": manifest["format_version"],
        "source": src,
        "ladder": manifest["ladder"],
        "group_size": manifest["group_size"],
        "plane_widths": manifest["plane_widths"],
        "grid": manifest["grid"],
        "zero_offset": manifest.get("zero_offset"),
        "rotation": manifest.get("rotation"),
        "quantized_modules": len(layouts),
        "quantized_weights": weights,
        "files": {n: e["bytes"] for n, e in files.items()},
        "precisions": {str(b): s for b, s in stats.items()},
        "verified_sha256": verify,
    }
