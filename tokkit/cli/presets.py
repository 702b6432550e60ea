"""`tokkit presets`: the named training presets, as a table."""

from __future__ import annotations

from rich.table import Table

from tokkit.cli.common import console, handle_errors


@handle_errors
def presets() -> None:
    """List the training presets (use one with `tokkit train --preset NAME`)."""
    from tokkit.config import DEFAULT_PRESET, get_preset, list_presets
    from tokkit.models.tokenizer import quantizer_from_config

    table = Table(title="tokkit presets  (* default; tokkit train --preset NAME --set field=value)")
    table.add_column("name", no_wrap=True)
    for col in ("px", "tokens", "quantizer", "codes", "bits", "autoencoder", "steps x batch"):
        table.add_column(col, justify="right" if col in ("px", "codes", "bits") else "left")
    table.add_column("description", overflow="fold")
    for name in list_presets():
        p = get_preset(name)
        t, tr = p.tokenizer, p.train
        q = quantizer_from_config(t)
        h, w = t.token_grid
        mult = ",".join(map(str, t.channel_mult))
        ae = f"{t.base_channels}x({mult}) r{t.num_res_blocks}" + (" +attn" if t.attention else "")
        table.add_row(
            name + (" *" if name == DEFAULT_PRESET else ""), str(t.resolution), f"{h}x{w}", t.quantizer,
            str(q.codebook_size), f"{q.bits_per_token:.1f}", ae, f"{tr.steps}x{tr.batch_size}", p.description,
        )  # fmt: skip
    console.print(table)
