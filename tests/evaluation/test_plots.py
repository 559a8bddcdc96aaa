"""Figures: pass@k on a log2 axis with bootstrap bands, budgets within the token limit, runs that
coincide stay visible, training curves from train_summary.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dail.cli import main
from dail.evaluation.plots import budget_figure, pass_at_k_figure, plot_summaries, training_figure

RUNS = {
    "base": {"pass@1": 0.1, "pass@2": 0.2, "pass@4": 0.3, "pass@8": 0.4,
             "pass@k_ci": {"1": [0.05, 0.15], "2": [0.1, 0.3], "4": [0.2, 0.4], "8": [0.3, 0.5]},
             "accuracy_under_budget": {"64": 0.05, "128": 0.1, "256": 0.1, "4096": 0.1}, "max_new_tokens": 128},
    "dail": {"pass@1": 0.1, "pass@2": 0.2, "pass@4": 0.3, "pass@8": 0.4,  # the same curve as base
             "pass@k_ci": {"1": [0.05, 0.15], "2": [0.1, 0.3], "4": [0.2, 0.4], "8": [0.3, 0.5]},
             "accuracy_under_budget": {"64": 0.05, "128": 0.1, "256": 0.1, "4096": 0.1}, "max_new_tokens": 128},
}


def test_pass_at_k_axis_is_log2_labelled_by_k_with_bands():
    ax = pass_at_k_figure(RUNS).axes[0]
    assert ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "4", "8"]
    assert [t for t in ax.get_xticks()] == [1, 2, 4, 8]
    bands = ax.collections  # fill_between: one band per run, spanning its interval
    assert len(bands) == 2
    low, high = bands[0].get_paths()[0].vertices[:, 1].min(), bands[0].get_paths()[0].vertices[:, 1].max()
    assert (low, high) == pytest.approx((0.05, 0.5))


def test_coinciding_runs_stay_visible():
    for fig in (pass_at_k_figure(RUNS), budget_figure(RUNS)):
        lines = fig.axes[0].get_lines()
        assert len(lines) == 2
        assert list(lines[0].get_ydata()) == list(lines[1].get_ydata())
        assert lines[0].get_marker() != lines[1].get_marker()
        assert lines[0].get_linestyle() != lines[1].get_linestyle()


def test_budgets_above_max_new_tokens_are_not_drawn():
    line = budget_figure(RUNS).axes[0].get_lines()[0]
    assert list(line.get_xdata()) == [64, 128]
    unknown = {"x": {**RUNS["base"], "max_new_tokens": None}}  # samples scored from elsewhere
    assert list(budget_figure(unknown).axes[0].get_lines()[0].get_xdata()) == [64, 128, 256, 4096]


def test_eval_records_max_new_tokens(problems_file, tmp_path, tiny_model_dir):
    out = tmp_path / "ev"
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(problems_file), "--out", str(out),
                 "--n", "1", "--max-new-tokens", "3", "--batch-size", "3"]) == 0
    assert json.loads((out / "summary.json").read_text())["max_new_tokens"] == 3


HISTORY = [
    {"loss": 1.0, "kl_privileged": 1.2, "kl_negative": 2.0, "learning_rate": 1e-4, "epoch": 0.5, "step": 1},
    {"loss": 0.5, "kl_privileged": 0.7, "kl_negative": 2.2, "learning_rate": 2e-4, "epoch": 1.0, "step": 2},
    {"train_runtime": 3.0, "train_loss": 0.75, "epoch": 1.0, "step": 2},
]


def test_training_figure_draws_loss_each_kl_term_and_learning_rate():
    fig = training_figure({"dail": {"log_history": HISTORY}})
    panels = {ax.get_ylabel(): ax for ax in fig.axes}
    assert list(panels) == ["loss", "kl_privileged", "kl_negative", "learning_rate"]
    kl = panels["kl_negative"].get_lines()[0]
    assert list(kl.get_xdata()) == [1, 2] and list(kl.get_ydata()) == [2.0, 2.2]


def test_dail_plot_takes_eval_and_train_summaries(tmp_path, capsys):
    ev = tmp_path / "eval_base"
    ev.mkdir()
    (ev / "summary.json").write_text(json.dumps(RUNS["base"]))
    tr = tmp_path / "train"
    tr.mkdir()
    (tr / "train_summary.json").write_text(json.dumps({"log_history": HISTORY}))
    assert main(["plot", str(ev), str(tr / "train_summary.json"), "--out", str(tmp_path / "figs")]) == 0
    written = capsys.readouterr().out.split()
    assert [p.rsplit("/", 1)[1] for p in written] == ["pass_at_k.png", "accuracy_vs_budget.png",
                                                      "training_curves.png"]
    for path in written:
        data = Path(path).read_bytes()
        assert data[:4] == b"\x89PNG" and len(data) > 5000


def test_dail_plot_refuses_a_folder_without_summaries_and_an_empty_history(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "empty"), "--out", str(tmp_path / "figs")]) == 2
    assert "holds neither summary.json" in capsys.readouterr().err
    (tmp_path / "t.json").write_text(json.dumps({"log_history": []}))
    assert main(["plot", str(tmp_path / "t.json"), "--out", str(tmp_path / "figs")]) == 2
    assert "log_history is empty" in capsys.readouterr().err
    assert not (tmp_path / "figs").exists()


def test_plot_summaries_writes_png_files(tmp_path):
    written = plot_summaries(RUNS, tmp_path / "plots")
    assert [p.name for p in written] == ["pass_at_k.png", "accuracy_vs_budget.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in written)


def test_comparison_table_stops_at_max_new_tokens_and_shows_the_difference():
    from dail.evaluation.report import comparison_table

    trained = {**RUNS["dail"], "pass@1": 0.25, "mean_tokens": 40.0}
    table = comparison_table({"base": {**RUNS["base"], "mean_tokens": 50.0}, "trained": trained})
    assert "| pass@1 | 0.1000 | 0.2500 | +0.1500 |" in table
    assert "| pass@8 | 0.4000 | 0.4000 | +0.0000 |" in table
    assert "| mean tokens | 50.0 | 40.0 | -10.0 |" in table
    assert "within 128 tokens" in table and "within 256 tokens" not in table


def test_summaries_without_answers_draw_no_empty_figures(tmp_path, capsys):
    proofs = {"pass@k_ci": {}, "mean_tokens": 10.0, "accuracy_under_budget": None, "num_verifiable": 0}
    assert plot_summaries({"base": proofs, "trained": proofs}, tmp_path / "figs") == []
    assert not list((tmp_path / "figs").iterdir())
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "summary.json").write_text(json.dumps(proofs))
    assert main(["plot", str(tmp_path / "ev"), "--out", str(tmp_path / "figs")]) == 2
    assert "nothing to draw: pass@k and accuracy need gold answers" in capsys.readouterr().err


def test_dail_plot_draws_runs_of_like_named_folders_and_says_which_it_leaves_out(tmp_path, monkeypatch, caplog):
    import matplotlib.axes

    drawn: list[str] = []
    plot = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, *a, **k: (drawn.append(k.get("label")), plot(self, *a, **k))[1])
    folders = []
    for method, summary in (("sft", RUNS["base"]), ("dail", RUNS["dail"]), ("proofs", {"mean_tokens": 9.0})):
        folder = tmp_path / method / "eval"  # every run's folder is called eval
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps(summary))
        folders.append(str(folder))
    with caplog.at_level("WARNING"):
        assert main(["plot", *folders, "--out", str(tmp_path / "figs")]) == 0
    assert {"sft/eval", "dail/eval"} <= set(drawn) and "proofs/eval" not in drawn
    assert any("proofs/eval is not in pass_at_k.png" in r.message for r in caplog.records)
