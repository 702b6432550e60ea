"""`tokkit info PATH`: describe a checkpoint folder or a token shard set."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from tokkit.cli import checks
from tokkit.cli.common import JsonOpt, fail, handle_errors
from tokkit.cli.output import emit_facts, emit_json
from tokkit.errors import TokkitError


@handle_errors
def info(
    path: Annotated[Path, typer.Argument(help="A checkpoint folder (or run folder) or a shard set folder.")],
    json_out: JsonOpt = False,
) -> None:
    """Describe a checkpoint (config, codebook, token grid, size) or a shard set (counts, dtype, sizes)."""
    if (path / "manifest.json").is_file() or path.name == "manifest.json":
        from tokkit.shards import describe

        root = path if path.is_dir() else path.parent
        facts = describe(root)
        problems = facts.pop("problems")
        if json_out:
            emit_json({"kind": "shard set", **facts, "problems": problems})
        else:
            _render("shard set", facts)
        if problems:
            raise fail(f"{root}: {problems[0]}; run tokkit verify {root}", 1)
    else:
        checks.checkpoint(path)  # before torch loads
        facts = describe_checkpoint(path)
        if json_out:
            emit_json({"kind": "checkpoint", **facts})
        else:
            _render("checkpoint", facts)
        if not facts["weights_match"]:
            msg = "model.safetensors does not match the sha256 in config.json (corrupt or replaced)"
            raise fail(f"{facts['path']}: {msg}", 1)


def describe_checkpoint(path: Path) -> dict[str, Any]:
    """Facts about a checkpoint folder: config, codebook, token grid, bits per token, weights size and hash check."""
    from tokkit.checkpoint import WEIGHTS, read_checkpoint_meta, resolve_checkpoint_dir, sha256_file
    from tokkit.config import TokenizerConfig
    from tokkit.models.tokenizer import quantizer_from_config

    d = resolve_checkpoint_dir(path)
    meta = read_checkpoint_meta(d, verify=False)
    cfg = TokenizerConfig.from_dict(meta["tokenizer"])
    try:
        q = quantizer_from_config(cfg)
    except TokkitError:
        q = None
    return {
        "path": str(d),
        "format": meta["format"],
        "tokkit_version": meta.get("tokkit_version"),
        "resolution": cfg.resolution,
        "token_grid": list(cfg.token_grid),
        "downsample_factor": cfg.downsample_factor,
        "quantizer": cfg.quantizer,
        "codebook_size": int(q.codebook_size) if q is not None else None,
        "bits_per_token": round(float(q.bits_per_token), 3) if q is not None else None,
        "weights_bytes": (d / WEIGHTS).stat().st_size,
        "weights_sha256": meta["weights_sha256"],
        "weights_match": sha256_file(d / WEIGHTS) == meta["weights_sha256"],
        "config": meta["tokenizer"],
        **_extra(meta.get("extra")),
    }


def _extra(extra: Any) -> dict[str, Any]:
    """config.json's ``extra`` notes; a converted peer's provenance (``tokkit convert``) as its own section."""
    if not isinstance(extra, dict) or not extra:
        return {}
    rest = {k: v for k, v in extra.items() if k != "provenance"}
    facts: dict[str, Any] = {"provenance": extra["provenance"]} if isinstance(extra.get("provenance"), dict) else {}
    return {**facts, **({"extra": rest} if rest else {})}


def _render(kind: str, facts: dict[str, Any]) -> None:
    rows = []
    for k, v in facts.items():
        if k == "path":
            continue
        if isinstance(v, dict) and k != "config":  # one row per field of a nested section
            rows += [(f"{k}.{sub}", _text(sub, sv)) for sub, sv in v.items() if sub != "config"]
            continue
        rows.append((k, _text(k, v)))
    emit_facts(f"{kind}: {facts.get('path')}", rows)


def _text(key: str, v: Any) -> str:
    if key in ("bytes", "weights_bytes") and isinstance(v, int):
        return f"{v:,} ({v / 2**20:.2f} MiB)"
    if isinstance(v, float):
        return f"{v:.4g}"
    return json.dumps(v, sort_keys=True) if isinstance(v, dict | list) else str(v)
