"""`tokkit convert SOURCE --out DIR`: a peer checkpoint (taming, LlamaGen, diffusers, ...) -> a tokkit checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tokkit.cli import checks
from tokkit.cli.common import JsonOpt, QuietOpt, RichReporter, handle_errors
from tokkit.cli.output import emit_json
from tokkit.errors import CheckpointError, OutputError


def _source_argument(value: str) -> str:
    """A local SOURCE exists (``hf:`` names are resolved later, by the library)."""
    if not value.startswith("hf:") and not Path(value).expanduser().exists():
        hint = "give a peer checkpoint file or folder, or hf:ORG/REPO/FILE"
        raise CheckpointError(f"no such file or folder: {value} ({hint})")
    return value


@handle_errors
def convert(
    source: Annotated[
        str,
        typer.Argument(
            callback=_source_argument,
            help="Peer checkpoint: a .ckpt/.pt/.pth/.bin/.safetensors file, a diffusers VQModel folder, or "
            "hf:ORG/REPO/FILE (hf:ORG/REPO or hf:ORG/REPO/SUBFOLDER for a diffusers folder).",
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", callback=checks.out_option, help="tokkit checkpoint folder to write.")
    ],
    config: Annotated[
        str | None,
        typer.Option("--config", help="taming's yaml (default: the yaml beside the .ckpt); a path or hf: name."),
    ] = None,
    family: Annotated[
        str | None,
        typer.Option(
            "--family", help="Force a family: taming, llamagen, diffusers, open-magvit2 or maskbit (default: detected)."
        ),
    ] = None,
    resolution: Annotated[
        int | None,
        typer.Option(
            "--resolution", min=1, show_default=False,
            help="Image side the tokenizer preprocesses to (default: the peer's training size when known, else 256).",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out.")] = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Convert a peer checkpoint into a tokkit checkpoint (safetensors + config.json recording its provenance).

    Pickled files are read with torch.load(weights_only=True) only; a file that needs more is refused.
    """
    if out.exists() and not force:
        raise OutputError(f"{out} exists: choose another --out, or pass --force to replace it")
    from tokkit.peers import convert_source

    res = convert_source(
        source, out, config, "cpu", family=family, overwrite=force, resolution=resolution,
        reporter=RichReporter(enabled=not quiet),
    )  # fmt: skip
    tok, prov = res.tokenizer, res.provenance
    params = sum(p.numel() for p in tok.parameters())
    h, w = tok.token_grid
    facts = {
        "out": res.out,
        "peer": res.family.name,
        "variant": res.variant,
        "params": params,
        "resolution": tok.resolution,
        "token_grid": [h, w],
        "codebook_size": tok.codebook_size,
        "bits_per_token": round(tok.bits_per_token, 3),
        "provenance": prov,
    }
    if json_out:
        emit_json(facts)
        return
    typer.echo(
        f"converted {res.family.name} {res.variant} -> {res.out}: {params / 1e6:.1f}M params, {h}x{w} tokens at "
        f"{tok.resolution} px, {tok.codebook_size} codes ({tok.bits_per_token:.3g} bits), "
        f"license {prov['license']}, source sha256 {prov['sha256'][:12]}"
    )
