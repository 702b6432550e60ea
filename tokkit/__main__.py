"""``python -m tokkit ...`` (what torchrun launches)."""

from tokkit.cli import main

main()
