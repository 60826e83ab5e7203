"""What every lesson module shares: the error type of bad settings, a figure helper, byte units."""

from __future__ import annotations

from edgellm.errors import EdgeLLMError


class LessonError(EdgeLLMError, ValueError):
    """Bad settings for a lesson's experiment (unknown format, stride larger than ctx, ...)."""


def new_figure(figsize=(7, 3.5)):
    """A (figure, axes) pair with a constrained layout; nothing is drawn on a global figure."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    return fig, ax


def format_bytes(n: float) -> str:
    """``1536 → '1.5 KiB'``: binary units, three significant digits."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return f"{n:.3g} TiB"
