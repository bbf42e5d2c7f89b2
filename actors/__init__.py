"""The Ray layer of ppray (installed as ``ppray.actors``). All Ray API calls live here."""

__all__: list[str] = []
