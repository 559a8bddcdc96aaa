"""Figures of runs: pass@k and accuracy under a token budget from eval summaries, and training
curves (loss, each KL term, learning rate) from `train_summary.json`.

Each `*_figure` function returns a matplotlib Figure (tests read its axes); `plot_summaries` and
`plot_training` save them as PNG files, and `plot_files` (`dail plot`) reads the summaries first.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from dail.data import DataError
from dail.evaluation.report import pass_at_k_keys

logger = logging.getLogger(__name__)

#: Values of the Trainer's log history drawn as training curves, in panel order.
TRAINING_CURVES = {
    "loss": "loss (what was minimised)",
    "kl_privileged": "KL to the privileged model",
    "kl_negative": "KL to the negative reference",
    "nll": "next-token loss",
    "grad_norm": "gradient norm",
    "learning_rate": "learning rate",
}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _styles() -> Iterator[dict[str, Any]]:
    """A marker and dash pattern per run, so runs whose lines coincide stay visible: the later
    line is dashed over the earlier one and their markers differ in shape and size."""
    markers = ("o", "s", "^", "D", "v", "P", "X")
    dashes = ("-", "--", ":", "-.")
    for i in itertools.count():
        yield {"marker": markers[i % len(markers)], "linestyle": dashes[i % len(dashes)],
               "markersize": 7 - 1.2 * (i % 4), "linewidth": 1.8, "alpha": 0.9}


def pass_at_k_figure(summaries: Mapping[str, Mapping[str, Any]], *, title: str = "") -> Any:
    """pass@k against k (log2 axis labelled 1, 2, 4, ...), with each run's 95% bootstrap band."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    all_ks: set[int] = set()
    for (name, summary), style in zip(summaries.items(), _styles(), strict=False):
        keys = pass_at_k_keys(summary)
        if not keys:
            continue
        ks = [int(k[5:]) for k in keys]
        all_ks.update(ks)
        (line,) = ax.plot(ks, [summary[k] for k in keys], label=name, **style)
        ci = summary.get("pass@k_ci") or {}
        bands = [(k, ci[str(k)]) for k in ks if ci.get(str(k))]
        if bands:
            ax.fill_between([k for k, _ in bands], [b[0] for _, b in bands], [b[1] for _, b in bands],
                            color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_xscale("log", base=2)
    ticks = sorted(all_ks)
    ax.set_xticks(ticks, [str(k) for k in ticks])
    ax.minorticks_off()
    ax.set(xlabel="k (samples per problem)", ylabel="pass@k", ylim=(0, 1.02),
           title=f"pass@k {title}".strip())
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    return fig


def budget_points(summary: Mapping[str, Any]) -> list[tuple[int, float]]:
    """(budget, accuracy) pairs to draw: budgets above the run's `max_new_tokens` are left out,
    since no response could be longer and they only repeat plain accuracy."""
    limit = summary.get("max_new_tokens")
    acc = summary.get("accuracy_under_budget") or {}
    return sorted((int(b), a) for b, a in acc.items()
                  if a is not None and (limit is None or int(b) <= limit))


def budget_figure(summaries: Mapping[str, Mapping[str, Any]], *, title: str = "") -> Any:
    """Accuracy against token budget, each run up to its own `max_new_tokens`."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for (name, summary), style in zip(summaries.items(), _styles(), strict=False):
        points = budget_points(summary)
        if points:
            ax.plot(*zip(*points, strict=True), label=name, **style)
    ax.set(xlabel="token budget", ylabel="accuracy", ylim=(0, 1.02),
           title=f"Accuracy under a token budget {title}".strip())
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    return fig


def training_figure(runs: Mapping[str, Mapping[str, Any]]) -> Any:
    """One panel per logged curve (`TRAINING_CURVES` that any run logged) against the step."""
    plt = _pyplot()
    histories = {name: [row for row in run.get("log_history") or [] if "step" in row]
                 for name, run in runs.items()}
    curves = [key for key in TRAINING_CURVES
              if any(key in row for rows in histories.values() for row in rows)]
    if not curves:
        raise ValueError("no training curve to draw: the summaries' log_history is empty")
    fig, axes = plt.subplots(len(curves), 1, figsize=(6, 2.2 * len(curves)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], curves, strict=True):
        for (name, rows), style in zip(histories.items(), _styles(), strict=False):
            points = [(row["step"], row[key]) for row in rows if isinstance(row.get(key), int | float)]
            if points:
                ax.plot(*zip(*points, strict=True), label=name, **style)
        ax.set_ylabel(key)
        ax.set_title(TRAINING_CURVES[key], fontsize=9)
    axes[-1, 0].set_xlabel("optimizer step")
    axes[0, 0].legend()
    fig.tight_layout()
    return fig


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def plot_summaries(summaries: Mapping[str, Mapping[str, Any]], out_dir: Any, *, title: str = "") -> list[Path]:
    """`pass_at_k.png` and `accuracy_vs_budget.png` of several eval summaries.

    Args:
        summaries: Run name -> summary (as written to summary.json).
        out_dir: Folder for the PNG files.
        title: Suffix for the plot titles.

    Returns:
        The paths written (none for summaries without pass@k, i.e. without gold answers).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    # Summaries of problems without gold answers have neither curve: no empty figures.
    if any(pass_at_k_keys(s) for s in summaries.values()):
        written.append(_save(pass_at_k_figure(summaries, title=title), out_dir / "pass_at_k.png"))
    if any(budget_points(s) for s in summaries.values()):
        written.append(_save(budget_figure(summaries, title=title), out_dir / "accuracy_vs_budget.png"))
    return written


def plot_training(runs: Mapping[str, Mapping[str, Any]], out_dir: Any) -> Path:
    """`training_curves.png` of several `train_summary.json` contents."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return _save(training_figure(runs), out_dir / "training_curves.png")


def plot_files(given: list[str], labels: list[str | None], out_dir: Any) -> list[Path]:
    """`dail plot`: the figures of eval summaries and of training summaries, given as files or
    their folders; each run is named by its label or its folder.

    Raises:
        DataError: an unreadable summary, or evaluations without gold answers (nothing to draw).
    """
    evals, trainings = {}, {}
    read = [read_summary(name) for name in given]
    for name, (_, summary) in zip(run_names([path for path, _ in read], labels), read, strict=True):
        (trainings if "log_history" in summary else evals)[name] = summary
    written = []
    if evals:
        written += plot_summaries(evals, out_dir)
        if not written:
            raise DataError(f"{', '.join(given)}: nothing to draw: pass@k and accuracy need "
                            f"gold answers, and none of these evaluations had any")
        for name, summary in evals.items():
            if not pass_at_k_keys(summary):
                logger.warning("%s is not in pass_at_k.png: its problems have no gold answers", name)
            elif not budget_points(summary):
                logger.warning("%s is not in accuracy_vs_budget.png: its summary has no accuracy under a budget",
                               name)
    if trainings:
        written.append(plot_training(trainings, out_dir))
    return written


def run_names(paths: list[Path], labels: list[str | None]) -> list[str]:
    """Each run's name in the legends: its label, else its folder's name, else (when folders
    share a name) as much of its path as tells them apart."""
    names = [label or path.parent.name for path, label in zip(paths, labels, strict=True)]
    depth = 1
    while len(set(names)) < len(names):
        depth += 1
        clashing = {n for n in names if names.count(n) > 1}
        longer = ["/".join(path.resolve().parent.parts[-depth:]) for path in paths]
        names = [longer[i] if n in clashing and not labels[i] else n for i, n in enumerate(names)]
        if depth > max(len(p.resolve().parts) for p in paths):
            raise DataError(f"two runs are named {sorted(clashing)[0]!r}; give each its own --labels")
    return names


def read_summary(given: str) -> tuple[Path, dict[str, Any]]:
    """An eval `summary.json` or a `train_summary.json`, given as the file or its folder."""
    path = Path(given)
    if path.is_dir():
        found = [path / name for name in ("summary.json", "train_summary.json") if (path / name).exists()]
        if not found:
            raise DataError(f"{path}: holds neither summary.json (dail eval) nor train_summary.json (dail train)")
        path = found[0]
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read a summary ({e})") from None
    if not isinstance(summary, dict):
        raise DataError(f"{path}: not a summary of dail eval or dail train")
    if "log_history" in summary and not summary["log_history"]:
        raise DataError(f"{path}: its log_history is empty, so there is no training curve to draw")
    return path, summary
