"""The ``tokkit`` command line: a thin typer shell over the library entry points."""

from tokkit.cli.app import app, main

__all__ = ["app", "main"]
