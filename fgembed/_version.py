"""The package version, in a module of its own: every module that records it imports this, never
the package `__init__` (which would import back into a package that is still loading)."""
__version__ = "0.1.0"
