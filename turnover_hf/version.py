"""The package version (one place: setuptools reads it, and so do saved configs and reports)."""

__version__ = "0.1.0"
