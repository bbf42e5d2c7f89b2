"""The simulator: a synthetic sky, raws, calibrations and truth tables."""

__all__: list[str] = []
