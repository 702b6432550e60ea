"""`tokkit bench` (being written)."""


def bench() -> None:
    """Not written yet."""
    raise NotImplementedError("tokkit bench")
