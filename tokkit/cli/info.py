"""`tokkit info` (being written)."""


def info() -> None:
    """Not written yet."""
    raise NotImplementedError("tokkit info")
