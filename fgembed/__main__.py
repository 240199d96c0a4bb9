"""`python -m fgembed …` (what torchrun launches) is the same as the `fgembed` command."""
from fgembed.cli.main import run

run()
