"""Matplotlib figures as PNG bytes, headless (the Agg backend), for the report, the exploration
and the training curve.

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ...
    data = png(fig)
"""

from __future__ import annotations

import io


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png(fig, dpi: float | None = None) -> bytes:
    """The figure laid out tightly as PNG bytes (at `dpi`, default the figure's); closes it."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    pyplot().close(fig)
    return buf.getvalue()
