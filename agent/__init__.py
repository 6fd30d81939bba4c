"""agent: runs each service of a set-top box in its own light VM (a *cell*)."""

__version__ = "0.1.0"
__all__ = ["__version__"]
