"""`tokkit encode` (being written)."""


def encode() -> None:
    """Not written yet."""
    raise NotImplementedError("tokkit encode")
