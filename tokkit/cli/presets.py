"""`tokkit presets`: the named training presets, as a table."""

from __future__ import annotations

from tokkit.cli.common import JsonOpt, handle_errors
from tokkit.cli.output import emit_json, emit_table

HEADERS = ["name", "px", "tokens", "quantizer", "codes", "bits", "autoencoder", "steps x batch", "description"]


@handle_errors
def presets(json_out: JsonOpt = False) -> None:
    """List the training presets (use one with `tokkit train --preset NAME`)."""
    import dataclasses

    from tokkit.config import DEFAULT_PRESET, get_preset, list_presets
    from tokkit.models.tokenizer import quantizer_from_config

    rows, found = [], {}
    for name in list_presets():
        p = get_preset(name)
        t, tr = p.tokenizer, p.train
        q = quantizer_from_config(t)
        h, w = t.token_grid
        mult = ",".join(map(str, t.channel_mult))
        ae = f"{t.base_channels}x({mult}) r{t.num_res_blocks}" + (" +attn" if t.attention else "")
        rows.append([
            name + (" *" if name == DEFAULT_PRESET else ""), str(t.resolution), f"{h}x{w}", t.quantizer,
            str(q.codebook_size), f"{q.bits_per_token:.1f}", ae, f"{tr.steps}x{tr.batch_size}", p.description,
        ])  # fmt: skip
        found[name] = {
            "default": name == DEFAULT_PRESET, "description": p.description, "codebook_size": int(q.codebook_size),
            "bits_per_token": float(q.bits_per_token), "tokenizer": dataclasses.asdict(t),
            "train": dataclasses.asdict(tr),
        }  # fmt: skip
    if json_out:
        emit_json({"default": DEFAULT_PRESET, "presets": found})
        return
    title = "tokkit presets  (* default; tokkit train --preset NAME --set field=value)"
    emit_table(title, HEADERS, rows, right_from=99, wrap_last=True)
