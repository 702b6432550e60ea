"""Writing a ``BenchResult`` down: results.json, report.md and the PNGs (matplotlib, Agg backend).

Plots: a reconstruction grid per checkpoint (input / reconstruction / error map), one sorted code-frequency curve
(log-log) with every checkpoint, and, where a quantizer's ``usage_report`` gave them, the per-bit balance (``bits``)
and the per-channel level usage (``levels``). Which sections exist is read from the data, never from the quantizer's
name; the labels in report.md and the plot titles name the kind of quantizer such a section comes from.
"""

from __future__ import annotations

import errno
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from tokkit.bench_types import BenchResult, CheckpointResult
from tokkit.checkpoint import atomic_path
from tokkit.errors import OutputError
from tokkit.protocols import Published, published_for

HEADERS = [
    "checkpoint",
    "quantizer",
    "K",
    "tokens",
    "bits/token",
    "bpp",
    "rFID",
    "LPIPS",
    "PSNR",
    "SSIM",
    "usage",
    "perplexity",
]


def _fmt(v: Any, spec: str) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return format(v, spec)


def comparable_published(r: CheckpointResult) -> list[Published]:
    """The peer's published rFIDs measured the way ``r`` was: same protocol, resolution and reference.

    Read from the checkpoint's provenance (``peer``, ``variant``, written by ``tokkit convert``); none for a
    checkpoint without it, and none when the FID reference was an external ``--ref-stats`` file.
    """
    if r.protocol.get("reference_external"):
        return []
    found = published_for(r.tokenizer.get("provenance"), r.tokenizer.get("resolution"))
    return [p for p in found if p.protocol == r.protocol.get("name")]


def other_published(r: CheckpointResult) -> list[Published]:
    """The peer's published rFIDs for this checkpoint that were measured some other way (not comparable)."""
    same = comparable_published(r)
    return [p for p in published_for(r.tokenizer.get("provenance")) if p not in same]


def _paper_cell(r: CheckpointResult) -> str:
    found = comparable_published(r)
    return " / ".join(f"{p.rfid:.2f}" for p in found) if found else "-"


def summary_rows(result: BenchResult) -> tuple[list[str], list[list[str]]]:
    """The table a person reads first: one row per checkpoint, "n/a" where a metric is unavailable or not asked.

    A "paper rFID" column is added when a checkpoint's peer published an rFID under the protocol used here.
    """
    with_paper = any(comparable_published(r) for r in result.results)
    rows = []
    for r in result.results:
        t, m, u = r.tokenizer, r.metrics, r.usage
        rows.append(
            [
                r.name,
                t["quantizer"],
                str(t["codebook_size"]),
                f"{t['token_grid'][0]}x{t['token_grid'][1]}",
                _fmt(t["bits_per_token"], ".2f"),
                _fmt(t["bits_per_pixel"], ".3f"),
                _fmt(m.get("rfid"), ".2f"),
                _fmt(m.get("lpips"), ".4f"),
                _fmt(m.get("psnr"), ".2f"),
                _fmt(m.get("ssim"), ".4f"),
                _fmt(u.get("usage", None) and 100 * u["usage"], ".1f") + ("%" if "usage" in u else ""),
                _fmt(u.get("perplexity"), ".1f"),
            ]
            + ([_paper_cell(r)] if with_paper else [])
        )
    return HEADERS + (["paper rFID"] if with_paper else []), rows


def notes(result: BenchResult) -> list[str]:
    """One line per distinct warning (training images ...) and reason a metric was unavailable, plus a warning for
    non-official weights."""
    seen: list[str] = []
    for r in result.results:
        for line in r.warnings:
            if line not in seen:
                seen.append(line)
        for why in r.unavailable.values():
            if why not in seen:
                seen.append(why)
        for w in r.protocol.get("weights", []):
            line = (
                f"{w['file']} is not the official file (sha256 {w['sha256'][:12]}...): its numbers are not comparable"
            )
            if not w["official"] and line not in seen:
                seen.append(line)
        for p in other_published(r):
            how = f"protocol {p.protocol}" if p.protocol else "the paper's own pipeline"
            line = (
                f"{r.name}: the published rFID {p.rfid:.2f} ({p.where}) was measured under {how} at {p.resolution} px, "
                f"not this run's ({r.protocol.get('name')}, {r.tokenizer.get('resolution')} px): not comparable"
            )
            if line not in seen:
                seen.append(line)
    return seen


# ----------------------------------------------------------------------------------------------------------------------
# files


def write_outputs(result: BenchResult, out: Path) -> None:
    """Write the PNGs, report.md and results.json into ``out`` and record their paths in ``result.files``.

    Every file is written to a temporary name and renamed into place; results.json goes last, and a results.json
    left by an earlier run is removed first, so a folder holding results.json holds a complete, matching set.

    Raises:
        OutputError: a file could not be written (read-only folder, no space left ...), in one line.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").unlink(missing_ok=True)
    except OSError as e:
        raise _output_error(out / "results.json", e) from None
    plt = _pyplot()
    for r in result.results:
        if r.grid is not None:
            r.files["reconstructions"] = _save(plt, plot_reconstructions(plt, r), out / f"{r.name}-recon.png")
        if "bits" in r.usage:
            r.files["bit_balance"] = _save(plt, plot_bit_balance(plt, r), out / f"{r.name}-bits.png")
        if "levels" in r.usage:
            r.files["level_usage"] = _save(plt, plot_level_usage(plt, r), out / f"{r.name}-levels.png")
    with_counts = [r for r in result.results if r.code_counts is not None and r.code_counts.size]
    if with_counts:
        result.files["code_frequency"] = _save(plt, plot_code_frequency(plt, with_counts), out / "code_frequency.png")
    if len(result.results) >= 2:
        rd = plot_rate_distortion(plt, result.results)
        result.files["rate_distortion"] = _save(plt, rd, out / "rate_distortion.png")
    result.files["results"] = str(out / "results.json")
    result.files["report"] = str(out / "report.md")
    _write_atomic(out / "report.md", lambda f: f.write(markdown(result, out).encode()))
    text = json.dumps(result.to_dict(), indent=2, default=_json_default) + "\n"
    _write_atomic(out / "results.json", lambda f: f.write(text.encode()))  # last: the mark of a complete set


def _write_atomic(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """``write(file)`` into a temporary file beside ``path``, then rename it into place; ``OutputError`` on failure."""
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise _output_error(path, e) from None


def _output_error(path: Path, e: OSError) -> OutputError:
    reason = e.strerror or str(e) or type(e).__name__
    hint = "free some space" if e.errno == errno.ENOSPC else "make it writable"
    return OutputError(f"cannot write {path}: {reason}; {hint} or choose another --out, then run bench again")


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def markdown(result: BenchResult, out: Path | None = None) -> str:
    """report.md: the table, the notes, the protocol, codebook details and the plots."""
    env = result.environment
    headers, rows = summary_rows(result)
    lines = ["# tokkit bench report", ""]
    lines += [f"- date: {env['date']}", f"- device: {env['device']}"]
    lines += [
        f"- data: `{env['data']['spec']}` ({env['data']['images_in_source']} images in the source, "
        f"fingerprint `{env['data']['fingerprint'][:16]}`)"
    ]
    lines += ["- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()), ""]
    lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines.append("")
    for n in notes(result):
        lines.append(f"> {n}")
    if notes(result):
        lines.append("")
    lines += [
        "rFID here compares reconstructions with the protocol's reference (by default their own inputs); it is not "
        "the FD-C10 / FD-TIN yardstick of `shared/tools/fdnet.py`, nor a generation FID.",
        "",
    ]
    lines += protocol_markdown(env.get("protocol"), result)
    if len(result.results) >= 2:
        lines += rate_distortion_markdown(result)
    for r in result.results:
        lines += _markdown_one(r, out)
    return "\n".join(lines) + "\n"


def protocol_markdown(proto: dict[str, Any] | None, result: BenchResult) -> list[str]:
    """The protocol, recorded in full (``Protocol.to_dict``), and where this run departs from the paper's."""
    if not proto:
        return []
    lines = [f"## Protocol `{proto['name']}`", "", proto["description"], ""]
    res = proto["resolution"]
    lines += [
        f"- resolution: {res if res else 'the tokenizer' + chr(39) + 's own'}",
        f"- resize + crop: {proto['resize_description']}",
        f"- image set in the paper: {proto['dataset']}"
        + (f", {proto['num_images']} images" if proto["num_images"] else ""),
        f"- to uint8: {proto['to_uint8']}",
        f"- FID reference: {proto['reference']}",
        f"- Inception: {proto['inception']}",
        f"- read from: {proto['source']}",
    ]
    lines += [f"- deviation: {d}" for d in proto["deviations"]]
    for r in result.results:
        if proto["num_images"] and r.protocol["num_images"] != proto["num_images"]:
            lines.append(
                f"- {r.name}: {r.protocol['num_images']} images measured, the paper uses {proto['num_images']}: "
                "rFID depends on the count, so compare with the paper only at the same count"
            )
            break
    for r in result.results:
        if r.protocol.get("resolution_note"):
            lines.append(f"- {r.name}: {r.protocol['resolution_note']}")
    if result.environment.get("ref_stats"):
        lines.append(f"- --ref-stats: `{result.environment['ref_stats']}`")
    return lines + [""]


def rate_distortion_markdown(result: BenchResult) -> list[str]:
    """One table over the checkpoints, sorted by bits per pixel, with the peers' published rFIDs where comparable."""
    lines = ["## Rate-distortion", "", "| checkpoint | bpp | rFID | paper rFID | PSNR | LPIPS |", "|---" * 6 + "|"]
    for r in sorted(result.results, key=lambda r: r.tokenizer["bits_per_pixel"]):
        m = r.metrics
        lines.append(
            f"| {r.name} | {_fmt(r.tokenizer['bits_per_pixel'], '.4f')} | {_fmt(m.get('rfid'), '.2f')} | "
            f"{_paper_cell(r)} | {_fmt(m.get('psnr'), '.2f')} | {_fmt(m.get('lpips'), '.4f')} |"
        )
    if "rate_distortion" in result.files:
        lines += ["", "![rate_distortion](rate_distortion.png)"]
    return lines + [""]


def _markdown_one(r: CheckpointResult, out: Path | None) -> list[str]:
    p, u = r.protocol, r.usage
    lines = [f"## {r.name}", "", f"`{r.checkpoint}` (weights sha256 `{p.get('checkpoint_sha256', '?')[:16]}`)", ""]
    lines += ["Protocol:", ""]
    lines += [
        f"- images: {p['num_images']} of {p['images_requested']} requested"
        + (f" ({len(p['unreadable_images'])} unreadable)" if p["unreadable_images"] else "")
        + (f"; {p['upscaled_images']} smaller than {p['resolution']} px were upscaled" if p["upscaled_images"] else "")
    ]
    for key in ("name", "selection", "preprocessing", "reference", "reconstruction", "psnr_ssim", "rfid", "lpips"):
        if key in p:
            lines.append(f"- {key}: {p[key]}")
    if p.get("processes", 1) > 1:
        lines.append(f"- processes: {p['processes']} (images split over torchrun ranks, sums all-reduced)")
    for w in p["weights"]:
        lines.append(
            f"- weights {w['name']}: `{w['file']}` sha256 `{w['sha256']}`"
            + ("" if w["official"] else " (NOT the official file)")
        )
    lines.append("")
    if u:
        lines += [
            f"Codebook: {u['used']} of {u['codebook_size']} codes used ({100 * u['usage']:.1f}%), perplexity "
            f"{u['perplexity']:.1f}, entropy {u['entropy_bits']:.2f} of {u['max_entropy_bits']:.2f} bits, "
            f"over {u['total']} tokens.",
            "",
        ]
    if "bits" in u:
        b = u["bits"]
        lines += [
            f"LFQ bits: {len(b['dead'])} dead (rarer value < 1%): {b['dead']}; sum of per-bit entropies "
            f"{b['sum_entropy_bits']:.2f} bits.",
            "",
        ]
    if "levels" in u:
        lv = u["levels"]
        dims = ", ".join(
            f"{used}/{L} ({e:.2f} bits)"
            for used, L, e in zip(lv["used"], lv["levels"], lv["entropy_bits"], strict=True)
        )
        lines += [f"FSQ levels used per dimension: {dims}.", ""]
    for key, path in r.files.items():
        rel = Path(path).name if out is not None else path
        lines += [f"![{key}]({rel})", ""]
    return lines


# ----------------------------------------------------------------------------------------------------------------------
# plots


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: Path) -> str:
    try:
        _write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    finally:
        plt.close(fig)
    return str(path)


def plot_reconstructions(plt: Any, r: CheckpointResult) -> Any:
    """Rows: input, reconstruction, per-pixel absolute error (mean over RGB, 0-255 scale, shared color scale)."""
    assert r.grid is not None
    inputs, recons = r.grid  # (N, H, W, 3) uint8 each
    err = np.abs(inputs.astype(np.float32) - recons.astype(np.float32)).mean(-1)  # (N, H, W)
    vmax = max(float(np.percentile(err, 99.5)), 1.0)
    n = inputs.shape[0]
    fig, axes = plt.subplots(3, n, figsize=(1.35 * n + 1.2, 4.3), squeeze=False)
    for i in range(n):
        axes[0, i].imshow(inputs[i], interpolation="nearest")
        axes[1, i].imshow(recons[i], interpolation="nearest")
        im = axes[2, i].imshow(err[i], cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for row, label in enumerate(["input", "reconstruction", "|error|"]):
        axes[row, 0].set_ylabel(label, fontsize=10)
    fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.015, pad=0.01, label="|error| (0-255)")
    m = r.metrics
    fig.suptitle(f"{r.name}: PSNR {_fmt(m.get('psnr'), '.2f')} dB, SSIM {_fmt(m.get('ssim'), '.3f')}", fontsize=11)
    return fig


def plot_rate_distortion(plt: Any, results: list[CheckpointResult]) -> Any:
    """Bits per pixel (x) against rFID, PSNR and LPIPS, one panel each; published rFIDs as hollow markers."""
    panels = [("rfid", "rFID (lower is better)"), ("psnr", "PSNR dB (higher is better)"), ("lpips", "LPIPS (lower)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    ordered = sorted(results, key=lambda r: r.tokenizer["bits_per_pixel"])
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        pts = [(r.tokenizer["bits_per_pixel"], r.metrics.get(key), r.name) for r in ordered]
        pts = [p for p in pts if p[1] is not None and not (isinstance(p[1], float) and math.isnan(p[1]))]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", lw=1.2, label="measured")
            for x, y, name in pts:
                ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        else:
            ax.text(0.5, 0.95, "not measured", ha="center", va="top", transform=ax.transAxes, color="gray")
        if key == "rfid":
            paper = [(r.tokenizer["bits_per_pixel"], p.rfid) for r in ordered for p in comparable_published(r)]
            if paper:
                ax.plot([p[0] for p in paper], [p[1] for p in paper], "s", mfc="none", label="published")
            if pts or paper:
                ax.legend(fontsize=7)
        ax.set_xlabel("bits per pixel")
        ax.set_title(label, fontsize=10)
        ax.grid(True, alpha=0.3)
    fig.suptitle("Rate-distortion", fontsize=11)
    return fig


def plot_code_frequency(plt: Any, results: list[CheckpointResult]) -> Any:
    """Sorted code frequencies (rank vs share of tokens, log-log), one line per checkpoint, uniform as dashes."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in results:
        c = r.code_counts
        assert c is not None
        freq = c / c.sum()
        k = r.usage["codebook_size"]
        (line,) = ax.loglog(
            np.arange(1, c.size + 1),
            freq,
            lw=1.6,
            label=f"{r.name}: {c.size}/{k} used, ppl {r.usage['perplexity']:.0f}",
        )
        ax.axhline(1.0 / k, color=line.get_color(), ls="--", lw=0.8, alpha=0.7)
    ax.set_xlabel("code rank (most frequent first)")
    ax.set_ylabel("share of tokens")
    ax.set_title("Sorted code frequency (dashed: uniform 1/K)")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8)
    return fig


def plot_bit_balance(plt: Any, r: CheckpointResult) -> Any:
    """Per-bit share of ones (the ``bits`` usage section); 0.5 is ideal, dead bits in red."""
    b = r.usage["bits"]
    p = np.asarray(b["balance"])
    colors = ["tab:red" if i in set(b["dead"]) else "tab:blue" for i in range(p.size)]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * p.size + 1.5), 3.2))
    ax.bar(np.arange(p.size), p, color=colors)
    ax.axhline(0.5, color="k", ls="--", lw=0.8)
    ax.set_ylim(0, 1)
    ax.set_xticks(np.arange(p.size))
    ax.set_xlabel("bit (0 = most significant)")
    ax.set_ylabel("P(bit = 1)")
    ax.set_title(f"{r.name}: per-bit balance ({len(b['dead'])} dead, red)")
    return fig


def plot_level_usage(plt: Any, r: CheckpointResult) -> Any:
    """Share of tokens at each level, one panel per quantized channel (the ``levels`` usage section)."""
    lv = r.usage["levels"]
    d = len(lv["levels"])
    fig, axes = plt.subplots(1, d, figsize=(2.0 * d + 1, 2.8), squeeze=False, sharey=True)
    for i, (ax, counts) in enumerate(zip(axes[0], lv["counts"], strict=True)):
        c = np.asarray(counts, dtype=np.float64)
        ax.bar(np.arange(c.size), c / max(c.sum(), 1))
        ax.axhline(1.0 / c.size, color="k", ls="--", lw=0.8)
        ax.set_title(f"dim {i}: {lv['entropy_bits'][i]:.2f}/{lv['max_entropy_bits'][i]:.2f} b", fontsize=9)
        ax.set_xticks(np.arange(c.size))
        ax.set_xlabel("level")
    axes[0, 0].set_ylabel("share of tokens")
    fig.suptitle(f"{r.name}: FSQ level usage per dimension (dashed: uniform)", fontsize=10, y=1.04)
    return fig
