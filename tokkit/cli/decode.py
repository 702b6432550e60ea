"""`tokkit decode` (being written)."""


def decode() -> None:
    """Not written yet."""
    raise NotImplementedError("tokkit decode")
