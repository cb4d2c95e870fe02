"""PNG charts with matplotlib (an optional dependency: `pip install 'lightopd[plot]'`): grouped
bars for `eval --compare --plot`, and accuracy curves for the consistency experiment."""

from __future__ import annotations

from pathlib import Path

from lightopd.errors import InputError


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise InputError("--plot needs matplotlib: pip install 'lightopd[plot]'") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def bars(path: str | Path, series: dict[str, dict[str, float]], title: str) -> Path:
    """One group of bars per metric, one bar per series (e.g. per compared eval result); metrics are fractions."""
    plt = _pyplot()
    metrics = list(dict.fromkeys(m for values in series.values() for m in values))
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(metrics) * max(1, len(series)) / 2), 4))
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(metrics))]
        ax.bar(xs, [values.get(m, 0.0) for m in metrics], width, label=name)
    ax.set_xticks(range(len(metrics)), metrics, rotation=20, ha="right")
    ax.set_ylim(0, 1.05)  # every charted metric is a fraction
    ax.set_title(title)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, plt, path)


def curves(path: str | Path, series: dict[str, list[tuple[float, float, float, float]]], title: str, xlabel: str,
           ylabel: str) -> Path:
    """One line per series of (x, y, low, high) points, low..high drawn as a band."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in series.items():
        xs, ys, lows, highs = zip(*points, strict=True)
        line = ax.plot(xs, ys, marker="o", label=name)[0]
        ax.fill_between(xs, lows, highs, color=line.get_color(), alpha=0.15)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, plt, path)


def _save(fig, plt, path: str | Path) -> Path:
    path = Path(path)
    try:
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise InputError(f"--plot {path}: cannot write ({e.strerror})") from None
    finally:
        plt.close(fig)
    return path
