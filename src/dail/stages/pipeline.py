"""`dail run`: one YAML config chains generate -> select -> train -> eval (base and trained).

Every stage writes into its own folder under `out`, named after a hash of the settings its
outputs depend on (`generate-<hash>`, `train-<hash>`, `eval_base-<hash>`, `eval_trained-<hash>`;
`stages.json` names the current ones). A stage whose folder is complete is skipped, so rerunning
the same command after an interruption picks up where it stopped, and a changed setting rebuilds
exactly the stages it affects: a new tau rebuilds generate, train and the trained model's eval;
a new LoRA rank, train and that eval; the base model's eval stays.

Config keys (all optional but `model`, `data`, `out`):
    model: a model id/path, or a mapping of `ModelConfig` fields
    data: training problems; eval_data: held-out test problems (required unless
        `eval_on_train: true`, which evaluates on the training problems instead)
    prompts, sampling: shared by every stage
    backend: the engine that samples in generate and eval (builtin, vllm, auto; see `dail generate`)
    generate: GenerateConfig fields (tau, samples, keep, ...)
    train: TrainConfig fields (loss, gamma, training: {TrainingArguments fields}); `traces` as a
        bare file name is a file of the generate stage's folder (default selected.jsonl;
        traces.jsonl trains on every trace)
    eval: EvalConfig fields (n, budgets, grader, ...)
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from dail.config import (
    ConfigError,
    EvalConfig,
    GenerateConfig,
    TrainConfig,
    from_dict,
    merge,
    to_dict,
    unknown_keys,
)
from dail.data import write_json_atomic

logger = logging.getLogger(__name__)

_SECTIONS = {"model", "data", "eval_data", "eval_on_train", "out", "prompts", "sampling", "backend", "generate",
             "train", "eval"}


def stage_configs(config: dict[str, Any], *, where: str = "config",
                  inputs: dict[str, str] | None = None) -> dict[str, Any]:
    """Validate a pipeline config; return the generate, train and per-eval stage configs, each
    with its output folder keyed by its settings.

    Args:
        inputs: Fingerprints of what paths do not pin down (`input_fingerprints`): the problems
            of `data` and `eval_data`, the tokenizer. They join the keys of the stages reading them.
    """
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
    inputs = inputs or {}
    model = config["model"] if isinstance(config["model"], dict) else {"model": config["model"]}
    shared = {"model": model, "prompts": config.get("prompts", {})}
    sampling = config.get("sampling", {})
    # The engine that samples, for generate and eval (`backend: vllm`; each section may override it).
    sampler = {"backend": config["backend"]} if config.get("backend") is not None else {}
    tokenizer = inputs.get("tokenizer")

    def build(cls: type, name: str, values: dict[str, Any], section: str, read: dict[str, Any],
              fixed: dict[str, Any] | None = None) -> Any:
        user = config.get(section) or {}
        if not isinstance(user, dict):
            raise ConfigError(f"{where}: {section}: expected a mapping of settings, got {user!r}")
        values = merge(merge({**values, "out": str(out / name)}, user), fixed or {})
        cfg = from_dict(cls, values, f"{where}: {section}")
        if isinstance(user, dict) and user.get("out"):
            return cfg  # the user named this stage's folder
        return replace(cfg, out=str(out / f"{name}-{stage_key(cfg, {**read, 'tokenizer': tokenizer})}"))

    generate = build(GenerateConfig, "generate", {**shared, **sampler, "data": config["data"], "sampling": sampling},
                     "generate", {"data": inputs.get("data")})
    # A bare file name names a file of the generate stage's folder (traces.jsonl: every trace).
    traces = config["train"].get("traces") if isinstance(config.get("train"), dict) else None
    traces = traces or "selected.jsonl"
    if isinstance(traces, str) and Path(traces).name == traces:
        traces = str(Path(generate.out) / traces)
    train = build(TrainConfig, "train", {**shared, "data": config["data"]}, "train", {"data": inputs.get("data")},
                  fixed={"traces": traces})
    stages: dict[str, Any] = {"generate": generate, "train": train}
    eval_values = {**shared, **sampler, "data": config.get("eval_data") or config["data"], "sampling": sampling}
    eval_input = {"data": inputs.get("eval_data") or inputs.get("data")}
    for name, adapter in (("base", None), ("trained", str(Path(train.out) / "adapter"))):
        stages[f"eval_{name}"] = build(EvalConfig, f"eval_{name}", {**eval_values, "adapter": adapter},
                                       "eval", eval_input)
    return stages


def stage_key(cfg: Any, inputs: dict[str, Any]) -> str:
    """A hash of what a stage's outputs depend on: its settings but the neutral ones (its
    folder, batch sizes, where logs go) and the fingerprints of its inputs. An upstream stage's
    folder is part of the path of what this stage reads, so its key flows downstream."""
    from dail.provenance import NEUTRAL_KEYS, TRAIN_NEUTRAL_KEYS, digest, without_neutral
    from dail.rollout.backend import resolve_backend

    neutral = TRAIN_NEUTRAL_KEYS if isinstance(cfg, TrainConfig) else NEUTRAL_KEYS
    settings = to_dict(cfg)
    if "backend" in settings:  # resolved: `auto` may stand for another backend on another machine
        settings["backend"] = resolve_backend(settings["backend"])
    return digest({"settings": without_neutral(settings, neutral), "inputs": inputs})


def input_fingerprints(config: dict[str, Any]) -> dict[str, str]:
    """Fingerprints of the pipeline's problems and of the model's tokenizer (read, not trusted
    to their paths), so that an input edited in place rebuilds what read it."""
    from dail import models
    from dail.config import ModelConfig
    from dail.data import resolve_problems
    from dail.provenance import problems_fingerprint, tokenizer_fingerprint

    model = config["model"] if isinstance(config["model"], dict) else {"model": config["model"]}
    found = {"data": problems_fingerprint(resolve_problems(config["data"])),
             "tokenizer": tokenizer_fingerprint(models.load_tokenizer(from_dict(ModelConfig, model)))}
    if config.get("eval_data"):
        found["eval_data"] = problems_fingerprint(resolve_problems(config["eval_data"]))
    return found


def check_stages(stages: dict[str, Any]) -> None:
    """Every stage's checks (`dail.stages.preflight`) before the first stage starts; inputs that an
    earlier stage is still to write are checked by that stage's settings instead."""
    from dail.stages import preflight

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
    from dail.stages import evaluate, generate, train
    from dail.training import report_to

    stages = stage_configs(config, where=where)
    # Hours of generation must not end in "tensorboard is not installed".
    report_to.check_report_to(stages["train"].training.get("report_to"),
                              where=f"{where}: train.training.report_to")
    check_stages(stages)
    stages = stage_configs(config, where=where, inputs=input_fingerprints(config))
    out = Path(config["out"])
    gen_cfg, train_cfg = stages["generate"], stages["train"]
    out.mkdir(parents=True, exist_ok=True)
    # The sft loss trains on the expert solutions: no traces are generated.
    runs = {name: cfg for name, cfg in stages.items() if not (name == "generate" and train_cfg.loss == "sft")}
    write_json_atomic(out / "stages.json", {name: cfg.out for name, cfg in runs.items()})

    if "generate" in runs and not _complete("generate", gen_cfg.out, "generate_summary.json"):
        generate.run(gen_cfg)
    if not _complete("train", train_cfg.out, "train_summary.json"):  # written after the adapter
        train.run(train_cfg)

    results = {}
    for name in ("base", "trained"):
        cfg = stages[f"eval_{name}"]
        summary_path = Path(cfg.out) / "summary.json"
        if _complete(f"eval_{name}", cfg.out, "summary.json"):
            results[name] = json.loads(summary_path.read_text(encoding="utf-8"))
        else:
            results[name] = evaluate.run(cfg)
    write_json_atomic(out / "results.json", results)
    write_results_markdown(out, results, eval_data=stages["eval_base"].data,
                           on_train=not config.get("eval_data"))
    return results


def _complete(name: str, folder: str, summary: str) -> bool:
    """Whether a stage's folder holds its summary (written last), said either way."""
    done = (Path(folder) / summary).is_file()
    logger.info("%s: %s", name, f"{folder} complete, skipped" if done else f"writing {folder}")
    return done


def write_results_markdown(out: Path, results: dict[str, Any], *, eval_data: str, on_train: bool) -> None:
    """`results.md` (the base-versus-trained table) and the pass@k and budget plots in `plots/`."""
    from dail.data import write_text_atomic
    from dail.evaluation.plots import plot_summaries
    from dail.evaluation.report import comparison_table

    plots = plot_summaries(results, out / "plots", title="(base vs trained)")
    where = f"{eval_data} (the training problems)" if on_train else eval_data
    text = [f"# Base versus trained on {where}", "", comparison_table(results)]
    text += [f"Note: {note}.\n" for note in dict.fromkeys(s["note"] for s in results.values() if s.get("note"))]
    text += [f"![{p.stem}](plots/{p.name})" for p in plots]
    write_text_atomic(out / "results.md", "\n".join(text) + "\n")
