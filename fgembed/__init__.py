"""fgembed: fine-grained visual classification with frozen foundation models."""
__version__ = "0.1.0"
