"""PNG plots of evaluation results: one line per model against context length.

Drawn on a bare `matplotlib.figure.Figure` (Agg canvas, no pyplot, no global backend switch),
so plotting works headless and in threads.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

Series = Mapping[str, Mapping[int, float]]
# a distinct (colour, marker, line) per name for up to 40 names: colours repeat after 10
_MARKERS = "osD^vP*Xh<"
_LINES = ("-", "--", "-.", ":")


def _style(i: int) -> dict:
    return {"color": f"C{i % 10}", "marker": _MARKERS[i % 10], "linestyle": _LINES[i // 10 % 4]}


def _new_figure(names: int) -> tuple[Figure, object]:
    """A figure and its axes; wider, with room for a legend on the right, for many names."""
    fig = Figure(figsize=(10, 4.5) if names > 5 else (7, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _legend(ax, names: int) -> None:
    if names > 5:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    else:
        ax.legend(fontsize=8)


def line_plot(series: Series, path: str | pathlib.Path, *, title: str, ylabel: str,
              log_y: bool = False, windows: Mapping[str, int] | None = None,
              ylim: tuple[float, float] | None = None) -> pathlib.Path:
    """Writes `path` (PNG): for each name, its {length: value} as a line over log2 lengths.

    windows: {name: context window}; each distinct window within the lengths is drawn as a
    dotted vertical line.
    """
    fig, ax = _new_figure(len(series))
    lengths = sorted({length for points in series.values() for length in points})
    for i, (name, points) in enumerate(series.items()):
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], label=name, **_style(i))
    for window in sorted(w for w in set((windows or {}).values()) if w <= lengths[-1]):
        ax.axvline(window, color="grey", linestyle=":", linewidth=1)
        ax.annotate(f"window {window}", (window, 1), xycoords=("data", "axes fraction"),
                    rotation=90, va="top", ha="right", fontsize=8, color="grey")
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(x) for x in lengths])
    if log_y:
        ax.set_yscale("log")
        plain = FuncFormatter(lambda value, _: f"{value:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    _legend(ax, len(series))
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path)
    return path


def perplexity_plot(series: Series, path: str | pathlib.Path, *, title: str,
                    windows: Mapping[str, int] | None = None) -> pathlib.Path:
    """Perplexity vs context length (log y: beyond the window it explodes)."""
    return line_plot(series, path, title=title, ylabel="perplexity", log_y=True, windows=windows)


def passkey_plot(series: Series, path: str | pathlib.Path, *, title: str,
                 windows: Mapping[str, int] | None = None) -> pathlib.Path:
    """Passkey retrieval accuracy (0..1) vs context length."""
    return line_plot(series, path, title=title, ylabel="passkey accuracy", windows=windows,
                     ylim=(-0.05, 1.05))


def scatter_plot(points: Mapping[str, tuple[float, float]], path: str | pathlib.Path, *,
                 title: str, xlabel: str, ylabel: str, log_x: bool = False) -> pathlib.Path:
    """Writes `path` (PNG): one point (x, y) per name, named in the legend (e.g. cost vs
    quality)."""
    fig, ax = _new_figure(len(points))
    for i, (name, (x, y)) in enumerate(points.items()):
        style = _style(i)
        ax.scatter([x], [y], label=name, color=style["color"], marker=style["marker"], s=40)
    if log_x:
        ax.set_xscale("log")
        plain = FuncFormatter(lambda value, _: f"{value:g}")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)
    _legend(ax, len(points))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path)
    return path
