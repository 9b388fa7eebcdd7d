"""The one place the version of harma is written (pyproject.toml reads it from here)."""

__version__ = "0.1.0"
