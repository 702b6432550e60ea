"""`tokkit verify` (being written)."""


def verify() -> None:
    """Not written yet."""
    raise NotImplementedError("tokkit verify")
