"""`tokkit presets` (being written)."""


def presets() -> None:
    """Not written yet."""
    raise NotImplementedError("tokkit presets")
