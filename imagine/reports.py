"""Evaluation reports across retrieval paths: a table, a JSON document and a bar chart."""

from __future__ import annotations

import json
from pathlib import Path

from imagine.evaluation import CategoryReport


def comparison_table(reports: dict[str, CategoryReport]) -> str:
    """Per-class AP for each path, then mAP and mean P@10."""
    names = list(reports)
    classes = list(next(iter(reports.values())).ap) if reports else []
    cw = max([len(c) for c in classes] + [10])
    width = max([len(n) for n in names] + [8])
    head = f"{'class':<{cw}}  " + "  ".join(f"{n:>{width}}" for n in names)
    lines = ["category AP per class (one text query per class, whole gallery)", head]
    for c in classes:
        row = "  ".join(f"{reports[n].ap.get(c, 0.0):>{width}.3f}" for n in names)
        lines.append(f"{c:<{cw}}  {row}")
    lines.append(f"{'mAP':<{cw}}  " + "  ".join(f"{reports[n].map:>{width}.3f}" for n in names))
    lines.append(
        f"{'P@10':<{cw}}  " + "  ".join(f"{reports[n].mean_p10:>{width}.3f}" for n in names)
    )
    return "\n".join(lines)


def write_json(reports: dict[str, CategoryReport], path: Path, **extra: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {**extra, "paths": {n: r.as_dict() for n, r in reports.items()}}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def bar_chart(reports: dict[str, CategoryReport], path: Path, title: str) -> Path:
    """mAP and P@10 per path as grouped bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(reports)
    xs = range(len(names))
    fig, ax = plt.subplots(figsize=(1.8 * len(names) + 2, 4))
    maps = [reports[n].map for n in names]
    p10s = [reports[n].mean_p10 for n in names]
    bars = ax.bar([x - 0.2 for x in xs], maps, width=0.4, label="mAP")
    ax.bar([x + 0.2 for x in xs], p10s, width=0.4, label="P@10")
    for bar, value in zip(bars, maps, strict=True):
        ax.text(bar.get_x() + bar.get_width() / 2, value + 0.01, f"{value:.3f}", ha="center")
    ax.set_xticks(list(xs), names)
    ax.set_ylim(0, 1.08)
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def recall_chart(recall: dict[str, dict[str, dict[int, float]]], path: Path, title: str) -> Path:
    """R@1/5/10 per path, one panel per direction (image -> text, text -> image)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(recall), figsize=(6 * len(recall), 4), squeeze=False)
    for ax, (direction, paths) in zip(axes[0], recall.items(), strict=True):
        names = list(paths)
        for j, k in enumerate((1, 5, 10)):
            xs = [i + (j - 1) * 0.27 for i in range(len(names))]
            bars = ax.bar(xs, [paths[n][k] for n in names], width=0.27, label=f"R@{k}")
            for bar, n in zip(bars, names, strict=True):
                h = paths[n][k]
                ax.text(bar.get_x() + bar.get_width() / 2, h + 0.01, f"{h:.2f}", ha="center",
                        fontsize=7)  # fmt: skip
        ax.set_xticks(range(len(names)), [n.replace(" (", "\n(") for n in names], fontsize=8)
        ax.set_ylim(0, 1.08)
        ax.set_title(direction)
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
