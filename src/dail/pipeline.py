"""`dail run`: one YAML config chains generate -> select -> train -> eval (base and trained).

Every stage writes into its own folder under `out` and is skipped when its final output is
already there, so rerunning the same command after an interruption picks up where it stopped.

Config keys (all optional but `model`, `data`, `out`):
    model: a model id/path, or a mapping of `ModelConfig` fields
    data: training problems; eval_data: held-out test problems (required unless
        `eval_on_train: true`, which evaluates on the training problems instead)
    prompts, sampling: shared by every stage
    generate: GenerateConfig fields (tau, samples, keep, ...)
    train: TrainConfig fields (loss, gamma, training: {TrainingArguments fields})
    eval: EvalConfig fields (n, budgets, grader, ...)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from dail.config import (
    ConfigError,
    EvalConfig,
    GenerateConfig,
    TrainConfig,
    from_dict,
    merge,
    unknown_keys,
)
from dail.data import write_json_atomic

logger = logging.getLogger(__name__)

_SECTIONS = {"model", "data", "eval_data", "eval_on_train", "out", "prompts", "sampling", "generate", "train",
             "eval"}


def stage_configs(config: dict[str, Any], *, where: str = "config") -> dict[str, Any]:
    """Validate a pipeline config; return the generate, train and per-eval stage configs."""
    error = unknown_keys(where, config, _SECTIONS)
    if error:
        raise error
    for key in ("model", "data", "out"):
        if not config.get(key):
            raise ConfigError(f"{where}: '{key}' is required")
    if config.get("eval_on_train", False) not in (True, False):
        raise ConfigError(f"{where}: eval_on_train must be true or false, not {config['eval_on_train']!r}")
    if not config.get("eval_data") and config.get("eval_on_train") is not True:
        raise ConfigError(f"{where}: 'eval_data' (held-out problems) is missing; set it, or set "
                          "eval_on_train: true to evaluate on the training problems")
    out = Path(config["out"])
    model = config["model"] if isinstance(config["model"], dict) else {"model": config["model"]}
    shared = {"model": model, "prompts": config.get("prompts", {})}
    sampling = config.get("sampling", {})
    stages: dict[str, Any] = {
        "generate": from_dict(GenerateConfig, merge(
            {**shared, "data": config["data"], "out": str(out / "generate"), "sampling": sampling},
            config.get("generate", {})), f"{where}: generate"),
        "train": from_dict(TrainConfig, merge(
            {**shared, "data": config["data"], "out": str(out / "train"),
             "traces": str(out / "generate" / "selected.jsonl")},
            config.get("train", {})), f"{where}: train"),
    }
    eval_values = {**shared, "data": config.get("eval_data") or config["data"], "sampling": sampling}
    for name, adapter in (("base", None), ("trained", str(out / "train" / "adapter"))):
        stages[f"eval_{name}"] = from_dict(EvalConfig, merge(
            {**eval_values, "out": str(out / f"eval_{name}"), "adapter": adapter},
            config.get("eval", {})), f"{where}: eval")
    return stages


def check_stages(stages: dict[str, Any]) -> None:
    """Every stage's checks (`dail.preflight`) before the first stage starts; inputs that an
    earlier stage is still to write are checked by that stage's settings instead."""
    from dail import preflight

    gen_cfg, train_cfg = stages["generate"], stages["train"]
    preflight.check_model(gen_cfg.model)
    if train_cfg.loss != "sft":
        preflight.check_generate(gen_cfg)
    traces = Path(train_cfg.traces) if train_cfg.traces else None
    preflight.check_train(train_cfg, traces_pending=traces is not None and not traces.exists()
                          and traces.parent == Path(gen_cfg.out))
    for name in ("base", "trained"):
        cfg = stages[f"eval_{name}"]
        preflight.check_eval(cfg, adapter_pending=cfg.adapter == str(Path(train_cfg.out) / "adapter"))


def run(config: dict[str, Any], *, where: str = "config") -> dict[str, Any]:
    """Run every stage that is not complete; returns `{"base": summary, "trained": summary}`."""
    from dail import evaluate, generate, reporting, train

    stages = stage_configs(config, where=where)
    # Hours of generation must not end in "tensorboard is not installed".
    reporting.check_report_to(stages["train"].training.get("report_to"),
                              where=f"{where}: train.training.report_to")
    check_stages(stages)
    out = Path(config["out"])
    gen_cfg, train_cfg = stages["generate"], stages["train"]

    if train_cfg.loss != "sft":
        if (Path(gen_cfg.out) / "generate_summary.json").exists():
            logger.info("generate: complete, skipped")
        else:
            generate.run(gen_cfg)
    if (Path(train_cfg.out) / "train_summary.json").exists():  # written after the adapter
        logger.info("train: complete, skipped")
    else:
        train.run(train_cfg)

    results = {}
    for name in ("base", "trained"):
        cfg = stages[f"eval_{name}"]
        summary_path = Path(cfg.out) / "summary.json"
        if summary_path.exists():
            logger.info("eval %s: complete, skipped", name)
            results[name] = json.loads(summary_path.read_text(encoding="utf-8"))
        else:
            results[name] = evaluate.run(cfg)
    write_json_atomic(out / "results.json", results)
    write_results_markdown(out, results, eval_data=stages["eval_base"].data,
                           on_train=not config.get("eval_data"))
    return results


def write_results_markdown(out: Path, results: dict[str, Any], *, eval_data: str, on_train: bool) -> None:
    """`results.md` (the base-versus-trained table) and the pass@k and budget plots in `plots/`."""
    from dail.data import write_text_atomic
    from dail.plots import plot_summaries
    from dail.report import comparison_table

    plots = plot_summaries(results, out / "plots", title="(base vs trained)")
    where = f"{eval_data} (the training problems)" if on_train else eval_data
    text = [f"# Base versus trained on {where}", "", comparison_table(results)]
    text += [f"![{p.stem}](plots/{p.name})" for p in plots]
    write_text_atomic(out / "results.md", "\n".join(text) + "\n")
