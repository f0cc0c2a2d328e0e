"""The package version (a leaf module: the checkpoint manifest records it)."""

__version__ = "0.1.0"
