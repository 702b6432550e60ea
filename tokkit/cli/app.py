"""The typer application; every command lives in its own small module and is registered here by name."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
import typer.core
from typer.core import TyperGroup

from tokkit.cli import bench, convert, decode, encode, export, info, presets, train, verify
from tokkit.cli.common import fail
from tokkit.errors import TokkitError

# typer >= 0.2x carries its own copy of click (typer.core._click); older ones use click itself
_click: Any = getattr(typer.core, "_click", None)
if _click is None or not hasattr(_click, "exceptions"):  # pragma: no cover - typer < 0.2x
    import click as _click


class OneLineErrors(TyperGroup):
    """Click's usage errors (a bad option value, a missing argument, an unknown option) as one ``error:`` line.

    Typer would draw them in a box under the usage text; tokkit prints every user mistake the same way: one line on
    stderr naming what is wrong and where to read more, exit status 2.
    """

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except _click.exceptions.UsageError as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # `tokkit` alone: the help was printed
                sys.exit(e.exit_code)
            where = e.ctx.command_path if e.ctx is not None else "tokkit"
            message = " ".join(e.format_message().split())  # one line, whatever click wrapped
            raise SystemExit(fail(f"{message} (see `{where} -h`)", e.exit_code).exit_code) from None
        except _click.exceptions.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except typer.Abort:
            raise SystemExit(fail("aborted", 1).exit_code) from None
        except TokkitError as e:  # raised before a command runs (see invoke)
            raise SystemExit(fail(str(e)).exit_code) from None
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx: Any) -> Any:
        """Refuse an unsafe torch before any command reads a file (``tokkit.runtime.check_torch_version``).

        The check reads the installed version without importing torch (seconds), so that a wrong path or value is
        still reported at once.
        """
        from tokkit.runtime import check_torch_version

        check_torch_version()
        return super().invoke(ctx)


app = typer.Typer(
    name="tokkit",
    cls=OneLineErrors,
    help="Discrete image tokenizers: train, encode to token shards, decode, benchmark.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if not value:
        return
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from tokkit import __version__

    try:
        torch = version("torch")
    except PackageNotFoundError:
        torch = "not installed"
    typer.echo(f"tokkit {__version__} (torch {torch}, python {platform.python_version()})")
    raise typer.Exit()


@app.callback()
def _root(
    show_version: Annotated[
        bool,
        typer.Option("--version", "-V", callback=_version, is_eager=True, help="Print the tokkit version and exit."),
    ] = False,
) -> None:
    """Discrete image tokenizers: train, encode to token shards, decode, benchmark."""


app.command("train")(train.train)
app.command("presets")(presets.presets)
app.command("encode")(encode.encode)
app.command("decode")(decode.decode)
app.command("verify")(verify.verify)
app.command("export")(export.export)
app.command("info")(info.info)
app.command("bench")(bench.bench)
app.command("convert")(convert.convert)


def main() -> None:
    """Console-script entry point."""
    app()
