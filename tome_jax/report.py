"""Tables and result files of measured rows (eval.py's sweep, the benchmark)."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import pathlib
from typing import Any, Callable, Sequence


COLUMNS = ("method", "settings", "r", "top1", "top5", "images_per_s", "speedup", "gflops", "tokens_left", "compile_s")


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] = COLUMNS) -> str:
    """A Markdown table of `columns` (accuracy in %, speed-ups and ratios as `1.23x`)."""
    def cell(key, value):
        if value is None:
            return "-"
        if key in ("top1", "top5"):
            return f"{100 * value:.2f}"
        if key in ("speedup", "ratio"):
            return f"{value:.2f}x"
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(k, row.get(k)) for k in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_results(
    rows: Sequence[dict[str, Any]],
    out_dir: str | pathlib.Path,
    meta: dict,
    *,
    stem: str = "sweep",
    plot: Callable[..., None] | None = None,
) -> None:
    """`stem`.json (rows + meta), `stem`.csv and `stem`.png (`plot`; default top-1 vs images/s).

    Each file is replaced whole (written aside, then renamed), so rewriting them
    after every row never leaves a half-written table behind.
    """
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with _replacing(out / f"{stem}.json") as path:
        path.write_text(json.dumps({"meta": meta, "rows": list(rows)}, indent=1))
    with _replacing(out / f"{stem}.csv") as path, open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(key for row in rows for key in row)))
        writer.writeheader()
        writer.writerows(rows)
    with _replacing(out / f"{stem}.png") as path:
        (plot or plot_tradeoff)(rows, path, title=meta.get("title", ""))


@contextlib.contextmanager
def _replacing(path: pathlib.Path):
    """A temporary path beside `path` to write; renamed over `path` on success."""
    partial = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)



def _axes():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    return plt, fig, ax


def _save(plt, fig, ax, path: pathlib.Path, title: str) -> None:
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_tradeoff(rows: Sequence[dict[str, Any]], path: pathlib.Path, title: str = "") -> None:
    """Top-1 against images/s, a point per row labelled with its r."""
    plt, fig, ax = _axes()
    xs = [row["images_per_s"] for row in rows]
    ys = [100 * row["top1"] for row in rows]
    ax.plot(xs, ys, "o", color="tab:blue")
    for row, x, y in zip(rows, xs, ys):
        ax.annotate(f"r={row['r']}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("images / s")
    _save(plt, fig, ax, path, title)


def plot_by_method(rows: Sequence[dict[str, Any]], path: pathlib.Path, title: str = "") -> None:
    """Top-1 against GFLOPs per image, a line per `method` (rows without a top-1 left out)."""
    plt, fig, ax = _axes()
    methods = list(dict.fromkeys(row["method"] for row in rows))
    for method in methods:
        points = sorted((row["gflops"], 100 * row["top1"]) for row in rows
                        if row["method"] == method and row.get("top1") is not None)  # fmt: skip
        if points:
            ax.plot(*zip(*points), "o-", label=method)
    ax.set_xlabel("GFLOPs per image")
    ax.legend(fontsize=8)
    _save(plt, fig, ax, path, title)
