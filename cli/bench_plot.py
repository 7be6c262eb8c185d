"""Shared PNG plumbing for the ``fdctl bench`` sub-commands: a headless figure, saved and closed."""
from __future__ import annotations

import os


def line_plots(out_path: str, title: str, panels: list[dict]) -> str:
    """One row of line-plot panels; each panel: ``xlabel``, ``ylabel``, ``series`` {label: [(x, y)...]},
    optional ``logx``. Writes ``out_path`` (its folder is created) and returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
