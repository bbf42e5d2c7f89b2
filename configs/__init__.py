"""Instrument and deployment YAML, shipped in the wheel as ``ppray._configs``."""
