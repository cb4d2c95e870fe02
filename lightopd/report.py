"""What the commands show: rich tables of eval results (and their comparison), of the demo and of
a store's description, on stderr; and PNG charts with matplotlib (an optional dependency:
`pip install 'lightopd[plot]'`): grouped bars for `eval --compare --plot`, and accuracy curves for
the consistency experiment."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from lightopd.errors import InputError
from lightopd.progress import console

BOUNDED = ("accuracy", "majority_accuracy", "truncation_rate", "teacher.top1_agree")  # fractions: one chart axis


# ---- tables ----

def flatten_eval(result: dict) -> dict[str, object]:
    """An eval result as {metric: value} rows: accuracy metrics, pass@k, teacher agreement."""
    rows = {}
    for key in ("accuracy", "majority_accuracy", "mean_completion_tokens", "truncation_rate"):
        if key in result:
            rows[key] = result[key]
    for k, v in result.get("pass@k", {}).items():
        rows[f"pass@{k}"] = v
    for k in ("rkl", "fkl", "k1", "top1_agree"):
        if k in result.get("teacher", {}):
            rows[f"teacher.{k}"] = result["teacher"][k]
    groups = result.get("groups") or {}
    for value, scores in (groups.get("scores") or {}).items():  # eval --group-by: each group's own rows
        for key in ("prompts", "accuracy", "majority_accuracy"):
            if key in scores:
                rows[f"{key} ({groups.get('field')} = {value})"] = scores[key]
    return rows


def _fraction(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1


def eval_result_problem(result: object) -> str | None:
    """What keeps `result` from being a saved eval result that the table and chart can read (None:
    nothing): its command, and each metric they show of the type and range eval writes."""
    if not isinstance(result, dict):
        return f"not an eval result (a JSON object), found a {type(result).__name__}"
    if result.get("command") != "eval":
        return f"not an eval result (its 'command' is {result.get('command')!r}, not 'eval')"
    for key in BOUNDED[:3]:
        if key in result and result[key] is not None and not _fraction(result[key]):
            return f"its {key!r} is {result[key]!r}, not a fraction in [0, 1]"
    tokens = result.get("mean_completion_tokens")
    if tokens is not None and (not isinstance(tokens, (int, float)) or isinstance(tokens, bool) or tokens < 0):
        return f"its 'mean_completion_tokens' is {tokens!r}, not a number >= 0"
    for key, checks in (("pass@k", _fraction), ("teacher", lambda v: v is None or isinstance(v, (int, float, str)))):
        value = result.get(key, {})
        if not isinstance(value, dict) or not all(checks(v) for v in value.values()):
            return f"its {key!r} is {value!r}, not an object of {'fractions' if key == 'pass@k' else 'numbers'}"
    if not isinstance(result.get("settings", {}), dict):
        return f"its 'settings' is {result['settings']!r}, not an object"
    return None


def render_eval(*results: dict, names: list[str] | None = None) -> None:
    """Eval results as one table, a column each."""
    table = Table(title="lightopd eval", title_justify="left")
    table.add_column("metric", style="bold")
    flats = [flatten_eval(r) for r in results]
    for name in names or [r.get("model", "?") for r in results]:
        table.add_column(str(name), justify="right")
    for key in dict.fromkeys(k for f in flats for k in f):
        table.add_row(key, *[f"{f[key]:.4f}" if isinstance(f.get(key), float) else str(f.get(key, "-"))
                             for f in flats])
    console.print(table)


def _leaves(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in _leaves(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def setting_differences(results: list[dict], names: list[str]) -> list[str]:
    """One line per setting that differs between eval results (prompts, sampling, checker, limit, the
    store): their numbers are not measured alike, so a side-by-side reading needs care."""
    lines = [f"{name} records no settings (made by an older lightopd); they cannot be checked"
             for name, r in zip(names, results, strict=True) if "settings" not in r]
    flat = [_leaves(r["settings"]) for r in results if "settings" in r]
    named = [n for n, r in zip(names, results, strict=True) if "settings" in r]
    for key in dict.fromkeys(k for f in flat for k in f if k not in ("prompts.path", "data.path")):
        values = [f.get(key) for f in flat]
        if any(v != values[0] for v in values):
            lines.append(f"results made with different {key}: " + ", ".join(f"{n}={v}" for n, v in
                                                                            zip(named, values, strict=True)))
    return lines


def compare_results(results: list[dict], names: list[str], plot: str | None = None) -> dict:
    """Saved eval results side by side: the table, the summary JSON, and a bar chart with `plot`."""
    render_eval(*results, names=names)
    flat = {name: flatten_eval(r) for name, r in zip(names, results, strict=True)}
    summary = {"command": "eval", "compare": flat}
    if plot is not None:
        series = {name: {k: v for k, v in values.items() if k in BOUNDED or k.startswith("pass@")}
                  for name, values in flat.items()}
        summary["plot"] = str(bars(plot, series, "lightopd eval"))
    return summary


NOT_CURVES = ("step", "tokens", "rows", "tokens_per_s", "seconds")  # a metrics.jsonl line's counts, not curves


def run_curves(paths: list[str], plot: str | None = None) -> dict:
    """Training runs side by side from their metrics.jsonl files: a table of each one's last step, and
    with `plot` a PNG of every curve (loss, lr, grad_norm, the objective's diagnostics) against the step."""
    runs: dict[str, list[dict]] = {}
    for p in paths:
        try:
            lines = [json.loads(line) for line in Path(p).read_text().splitlines() if line.strip()]
        except (OSError, ValueError) as e:
            raise InputError(f"--compare {p}: not a readable metrics.jsonl ({type(e).__name__}: {e})") from None
        if not lines or not all(isinstance(r, dict) and isinstance(r.get("step"), int) for r in lines):
            raise InputError(f"--compare {p}: not a training run's metrics.jsonl (a JSON line per step)")
        name = Path(p).parent.name or Path(p).stem
        runs[name if name not in runs else p] = lines
    keys = list(dict.fromkeys(k for lines in runs.values() for r in lines for k, v in r.items()
                              if k not in NOT_CURVES and isinstance(v, (int, float)) and not isinstance(v, bool)))
    table = Table(title="lightopd train: the last step", title_justify="left")
    table.add_column("metric", style="bold")
    for name in runs:
        table.add_column(name, justify="right")
    table.add_row("step", *[str(lines[-1]["step"]) for lines in runs.values()])
    for key in keys:
        table.add_row(key, *[f"{lines[-1][key]:.4g}" if key in lines[-1] else "-" for lines in runs.values()])
    console.print(table)
    summary = {"command": "eval", "runs": {name: {"steps": lines[-1]["step"], "last": {k: lines[-1].get(k)
                                                                                      for k in keys}}
                                           for name, lines in runs.items()}}
    if plot is not None:
        plt = _pyplot()
        cols = 3
        fig, axes = plt.subplots((len(keys) + cols - 1) // cols, cols, figsize=(12, 3 * ((len(keys) + 2) // cols)),
                                 squeeze=False)
        for ax, key in zip(axes.flat, keys, strict=False):
            for name, lines in runs.items():
                points = [(r["step"], r[key]) for r in lines if isinstance(r.get(key), (int, float))]
                if points:
                    ax.plot(*zip(*points, strict=True), label=name)
            ax.set_title(key)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(keys):]:
            ax.axis("off")
        axes.flat[0].legend()
        fig.supxlabel("step")
        fig.tight_layout()
        summary["plot"] = str(_save(fig, plt, plot))
    return summary


def render_demo(results: dict, models: tuple[str, ...], formats: tuple[str, ...]) -> None:
    """The demo's held-out table: accuracy, and each solution format's share and accuracy."""
    table = Table(title="lightopd demo: held-out exact match (one sample per prompt, T = 1)", title_justify="left")
    table.add_column("model", style="bold")
    table.add_column("accuracy", justify="right")
    for fmt in formats:
        table.add_column(f"{fmt}: share / acc", justify="right")
    for name in models:
        r = results[name]
        cells = [f"{r['format_share'][f]:.1%} / {r['format_accuracy'][f]:.1%}" if f in r["format_share"] else "-"
                 for f in formats]
        table.add_row(name, f"{r['accuracy']:.1%}", *cells)
    console.print(table)


def render_store(summary: dict) -> None:
    """A store's description as key/value rows, nested metadata flattened with dots."""
    table = Table(title=f"{summary['path']} ({summary['format']})", show_header=False, title_justify="left")
    table.add_column("key", style="bold")
    table.add_column("value")

    def add(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                add(f"{prefix}.{k}" if prefix else k, v)
        else:
            table.add_row(prefix, "-" if value is None else str(value))

    first = ("format", "complete", "shards_written", "num_shards", "rows", "tokens", "bytes", "bytes_per_token")
    for key in first:
        add(key, summary.get(key))
    for key, value in summary.items():
        if key not in first and key not in ("path", "stats"):
            add(key, value)
    console.print(table)


def render_stats(stats: dict) -> None:
    """`inspect --stats`: bytes per token by column, lengths, finish reasons and rewards, and the
    per-token quantiles by position bucket."""
    table = Table(title="bytes per completion token", show_header=False, title_justify="left")
    for name, size in sorted(stats["bytes_per_token"].items(), key=lambda kv: -kv[1]):
        if size >= 0.05:
            table.add_row(name, f"{size:.2f}")
    console.print(table)
    table = Table(title="rows", show_header=False, title_justify="left")
    for name, q in stats.get("lengths", {}).items():
        table.add_row(f"{name} tokens (p10 / p50 / p90)", " / ".join(str(v) for v in q.values()))
    for reason, rows in stats.get("finish_reasons", {}).items():
        table.add_row(f"finish_reason {reason}", str(rows))
    for key, value in stats.get("rewards", {}).items():
        table.add_row(f"rewards {key}", " / ".join(str(v) for v in value.values()) if isinstance(value, dict)
                      else str(value))
    console.print(table)
    if stats.get("by_position"):
        names = [k for k in stats["by_position"][0] if k not in ("positions", "tokens")]
        labels = {"teacher_entropy": "teacher entropy", "teacher_tail_mass": "tail mass", "teacher_logprob": "ℓT",
                  "student_minus_teacher": "ℓμ − ℓT"}
        table = Table(title="by position in the completion", title_justify="left")
        for column in ("positions", "tokens", "", "p10", "p50", "p90"):
            table.add_column(column, justify="right" if column not in ("", "positions") else "left", no_wrap=True)
        for row in stats["by_position"]:
            for i, n in enumerate(names):
                table.add_row(row["positions"] if i == 0 else "", str(row["tokens"]) if i == 0 else "", labels[n],
                              *("-" if row[n][q] is None else f"{row[n][q]:.4g}" for q in ("p10", "p50", "p90")),
                              end_section=i == len(names) - 1)
        console.print(table)


# ---- charts ----


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


def render_rows(rows: list[dict], out=None) -> None:
    """Decoded store rows (`inspect --show`), one panel each, on `out` (a rich Console; the stderr one
    by default)."""
    from rich.panel import Panel
    from rich.text import Text

    for row in rows:
        body = Text()
        for key in ("prompt", "teacher_prompt", "completion"):
            if key in row:
                body.append(f"{key}: ", style="bold").append(f"{row[key]}\n")
        rest = {k: v for k, v in row.items()
                if k not in ("prompt", "teacher_prompt", "completion", "prompt_id", "sample_index")}
        body.append("  ".join(f"{k}={v}" for k, v in rest.items() if v is not None), style="dim")
        (out or console).print(Panel(body, title=f"{row['prompt_id']} #{row['sample_index']}", title_align="left"))
