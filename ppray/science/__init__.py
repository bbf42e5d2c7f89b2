"""Science steps: stateless functions on images and catalogs."""

__all__: list[str] = []
