"""`tokkit train` (being written)."""


def train() -> None:
    """Not written yet."""
    raise NotImplementedError("tokkit train")
