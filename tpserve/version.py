"""The package version (also in pyproject.toml), where every layer can read it."""

__version__ = "0.1.0"
