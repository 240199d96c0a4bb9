"""The fgembed command line (installed as `fgembed.cli`); a thin skin over the library."""
