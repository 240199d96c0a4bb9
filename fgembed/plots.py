"""Writing matplotlib figures: one place for the file-only backend and the save-and-close step."""
from __future__ import annotations

from pathlib import Path


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Lay out, save (creating the folder) and close `fig`; returns the path written."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
