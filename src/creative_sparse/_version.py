"""The library's version: one source, importable from any layer without loading the others."""

__version__ = "0.1.0"
