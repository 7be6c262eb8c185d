"""``fdctl trace-plot``: render a step trace (``--trace FILE`` of generate/bench) as a PNG timeline.

Needs matplotlib (the ``[plot]`` extra); without it the command ends with one error line naming the extra."""
from __future__ import annotations

import json

import click

from fastdecode.cli.bench_plot import PlotUnavailableError, headless_pyplot
from fastdecode.cli.errors import OneLineCommand, OneLineError


def render_timeline(trace: dict, out_path: str, *, max_steps: int = 4) -> None:
    """One row per lane (GPU, then each KV node), bars coloured by mini-batch, for the
    last ``max_steps`` decode steps (the steady state). PlotUnavailableError without matplotlib."""
    plt = headless_pyplot()
    steps = trace["steps"][-max_steps:]
    if not steps:
        raise ValueError("the trace has no decode steps")
    first = {s["step"] for s in steps}
    intervals = [i for i in trace["intervals"] if i["step"] in first]
    lanes = ["gpu"] + sorted({i["lane"] for i in intervals} - {"gpu"})
    origin = steps[0]["start_s"]
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    fig, ax = plt.subplots(figsize=(12, 1 + 0.6 * len(lanes)))
    for row, lane in enumerate(lanes):
        bars = [((i["start_s"] - origin) * 1e3, (i["end_s"] - i["start_s"]) * 1e3, i["minibatch"])
                for i in intervals if i["lane"] == lane]
        for start, width, minibatch in bars:
            ax.broken_barh([(start, width)], (row - 0.4, 0.8), color=colours[minibatch % len(colours)])
    for s in steps:
        ax.axvline((s["start_s"] - origin) * 1e3, color="grey", lw=0.5, ls="--")
    ax.set_yticks(range(len(lanes)), lanes)
    ax.set_xlabel("ms")
    summary = trace.get("summary", {})
    overlap = summary.get("overlap")
    title = f"last {len(steps)} decode steps, batch {steps[-1]['batch_size']}"
    if overlap is not None:
        title += f", overlap {overlap:.2f}"
    ax.set_title(title + " (colour = mini-batch)")
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


@click.command("trace-plot", cls=OneLineCommand)
@click.argument("trace_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_path", required=True, help="PNG file to write.")
@click.option("--steps", "max_steps", default=4, show_default=True, type=click.IntRange(1),
              help="How many final steps to draw.")
def trace_plot(trace_file: str, out_path: str, max_steps: int) -> None:
    """Render a step trace as a PNG timeline of GPU and shard busy time."""
    try:
        with open(trace_file) as f:
            trace = json.load(f)
        try:
            render_timeline(trace, out_path, max_steps=max_steps)
        except OSError as exc:  # the PNG could not be written (no such folder, no permission)
            raise OneLineError(f"cannot write {out_path}: {exc.strerror or exc}") from None
    except PlotUnavailableError as exc:
        raise OneLineError(str(exc)) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise OneLineError(f"{trace_file} is not a step trace: {exc}") from None
    click.echo(out_path)
