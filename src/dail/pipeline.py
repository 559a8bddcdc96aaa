"""`dail run`: one YAML config chains generate -> select -> train -> eval (base and trained).

Every stage writes into its own folder under `out` and is skipped when its final output is
already there, so rerunning the same command after an interruption picks up where it stopped.

Config keys (all optional but `model`, `data`, `out`):
    model: a model id/path, or a mapping of `ModelConfig` fields
    data: training problems; eval_data: test problems (default: data)
    prompts, sampling: shared by every stage
    generate: GenerateConfig fields (tau, samples, keep, ...)
    train: TrainConfig fields (loss, gamma, training: {TrainingArguments fields})
    eval: EvalConfig fields (n, budgets, grader, ...)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from dail.config import ConfigError, EvalConfig, GenerateConfig, TrainConfig, from_dict, merge
from dail.data import write_json_atomic

logger = logging.getLogger(__name__)

_SECTIONS = {"model", "data", "eval_data", "out", "prompts", "sampling", "generate", "train", "eval"}


def run(config: dict[str, Any], *, where: str = "config") -> dict[str, Any]:
    """Run every stage that is not complete; returns `{"base": summary, "trained": summary}`."""
    from dail import evaluate, generate, train

    unknown = sorted(set(config) - _SECTIONS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(_SECTIONS)}")
    for key in ("model", "data", "out"):
        if not config.get(key):
            raise ConfigError(f"{where}: '{key}' is required")
    out = Path(config["out"])
    model = config["model"] if isinstance(config["model"], dict) else {"model": config["model"]}
    shared = {"model": model, "prompts": config.get("prompts", {})}
    sampling = config.get("sampling", {})

    gen_cfg = from_dict(GenerateConfig, merge({**shared, "data": config["data"], "out": str(out / "generate"),
                                               "sampling": sampling}, config.get("generate", {})),
                        f"{where}: generate")
    train_cfg = from_dict(TrainConfig, merge({**shared, "data": config["data"], "out": str(out / "train"),
                                              "traces": str(out / "generate" / "selected.jsonl")},
                                             config.get("train", {})), f"{where}: train")
    eval_values = {**shared, "data": config.get("eval_data") or config["data"], "sampling": sampling}
    eval_section = config.get("eval", {})

    if train_cfg.loss != "sft":
        if (out / "generate" / "generate_summary.json").exists():
            logger.info("generate: complete, skipped")
        else:
            generate.run(gen_cfg)
    adapter = out / "train" / "adapter"
    if (adapter / "adapter_config.json").exists():
        logger.info("train: complete, skipped")
    else:
        train.run(train_cfg)

    results = {}
    for name, adapter_dir in (("base", None), ("trained", str(adapter))):
        target = out / f"eval_{name}"
        if (target / "summary.json").exists():
            logger.info("eval %s: complete, skipped", name)
            import json

            results[name] = json.loads((target / "summary.json").read_text(encoding="utf-8"))
            continue
        cfg = from_dict(EvalConfig, merge({**eval_values, "out": str(target), "adapter": adapter_dir},
                                          eval_section), f"{where}: eval")
        results[name] = evaluate.run(cfg)
    write_json_atomic(out / "results.json", results)
    return results
