"""One colour per run, the same in the app's charts and in the figures.

Matplotlib's tab10 with the baseline blue and the BN red first (the shipped pair), then tab20's
lighter shades: twenty runs compared before a colour comes back (a sweep's rows chosen in the
app's table; six colours made the seventh run look like the first).
"""

from __future__ import annotations

__all__ = ["RUN_COLORS", "run_color"]

RUN_COLORS: tuple[str, ...] = (
    "#1f77b4",  # blue
    "#d62728",  # red
    "#2ca02c",  # green
    "#9467bd",  # purple
    "#ff7f0e",  # orange
    "#8c564b",  # brown
    "#e377c2",  # pink
    "#17becf",  # cyan
    "#bcbd22",  # olive
    "#7f7f7f",  # grey
    "#aec7e8",
    "#ff9896",
    "#98df8a",
    "#c5b0d5",
    "#ffbb78",
    "#c49c94",
    "#f7b6d2",
    "#9edae5",
    "#dbdb8d",
    "#c7c7c7",
)


def run_color(i: int) -> str:
    """The colour of the `i`-th run compared (from 0); past twenty they come round again."""
    return RUN_COLORS[i % len(RUN_COLORS)]
