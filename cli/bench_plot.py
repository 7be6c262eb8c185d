"""Shared PNG plumbing for the ``fdctl bench`` sub-commands and ``fdctl trace-plot``: a headless figure, saved and
closed. matplotlib is the optional ``[plot]`` extra: without it a bench command still prints its JSON and writes its
other files, and warns on stderr for each PNG it skips."""
from __future__ import annotations

import os
import sys
from typing import Any

PLOT_EXTRA_HINT = "pip install 'fastdecode[plot]'"


class PlotUnavailableError(ImportError):
    """matplotlib is not installed: plots need the ``[plot]`` extra."""


def headless_pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend; PlotUnavailableError naming the extra when it is missing."""
    try:
        import matplotlib
    except ImportError:
        message = f"drawing plots needs matplotlib, which is not installed: {PLOT_EXTRA_HINT}"
        raise PlotUnavailableError(message) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def warn_plot_skipped(out_path: str, exc: Exception) -> None:
    """One stderr line for a PNG that a bench command skipped (its JSON and other files are not affected)."""
    print(f"Warning: {out_path} not drawn: {exc}", file=sys.stderr)


def line_plots(out_path: str, title: str, panels: list[dict]) -> str | None:
    """One row of line-plot panels; each panel: ``xlabel``, ``ylabel``, ``series`` {label: [(x, y)...]},
    optional ``logx``. Writes ``out_path`` (its folder is created) and returns it; without matplotlib it warns
    (``warn_plot_skipped``) and returns None."""
    try:
        plt = headless_pyplot()
    except PlotUnavailableError as exc:
        warn_plot_skipped(out_path, exc)
        return None
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for label, points in panel["series"].items():
            points = [(x, y) for x, y in points if y is not None]
            if points:
                ax.plot(*zip(*points), "o-", label=label)
        if panel.get("logx"):
            ax.set_xscale("log", base=2)
        ax.set_xlabel(panel["xlabel"])
        ax.set_ylabel(panel["ylabel"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def parse_int_list(text: str, name: str) -> list[int]:
    """``"1,8,16"`` -> [1, 8, 16]; ValueError naming ``name`` on anything but positive integers."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{name} must be comma-separated positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{name} must be comma-separated positive integers, got {text!r}")
    return values
