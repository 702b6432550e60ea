"""The typer application; every command lives in its own small module and is registered here by name."""

from __future__ import annotations

import typer

from tokkit.cli import bench, decode, encode, info, presets, train, verify

app = typer.Typer(
    name="tokkit",
    help="Discrete image tokenizers: train, encode to token shards, decode, benchmark.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

app.command("train")(train.train)
app.command("presets")(presets.presets)
app.command("encode")(encode.encode)
app.command("decode")(decode.decode)
app.command("verify")(verify.verify)
app.command("info")(info.info)
app.command("bench")(bench.bench)


def main() -> None:
    """Console-script entry point."""
    app()
