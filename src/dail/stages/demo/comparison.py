"""The comparison, stage by stage: the world's validity, problems, traces from each data source,
one adapter per method and training seed, evaluations; each stage cached in a folder named after
a hash of its settings."""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from dail.config import (
    ConfigError,
    EvalConfig,
    GenerateConfig,
    ModelConfig,
    PromptConfig,
    SamplingConfig,
    TrainConfig,
)
from dail.data import write_json_atomic, write_text_atomic
from dail.rollout.prompts import NEGATIVE_TEMPLATE
from dail.stages.demo.report import plot, report
from dail.stages.demo.settings import METHODS, QUICK, SOURCES, DemoSettings

logger = logging.getLogger(__name__)


def run(out: str | None = None, *, quick: bool = False, settings: DemoSettings | None = None,
        model_dir: str | Path | None = None) -> dict[str, Any]:
    """Run (or resume) the whole comparison; returns the results also written to `results.json`.

    Args:
        out: Output folder (default runs/demo, or runs/demo-quick with `quick`).
        quick: Toy scale (every stage, a few minutes).
        settings: Explicit scale, overriding `quick`.
        model_dir: Base model (default: the committed world model).
    """
    from dail import world
    from dail.rollout.backend import require

    settings = settings or (QUICK if quick else DemoSettings())
    backend = require(settings.backend)  # checked before any stage
    root = Path(out or ("runs/demo-quick" if quick else "runs/demo"))
    if model_dir is None and not (world.base_model_dir() / "config.json").exists():
        logger.warning("the didactic world's base model is not built yet (`dail world pretrain`); "
                       "running the pipeline smoke test on CHAMP with a tiny random model instead")
        return smoke(root / "smoke")
    model_dir = Path(model_dir) if model_dir else world.base_model_dir()
    if not (model_dir / "config.json").exists():
        raise ConfigError(f"{model_dir}: no model here (config.json missing)")
    if settings.lora_target_modules != "all-linear":  # refused before any stage, not at the first training
        from dail.stages.preflight import check_lora_targets

        check_lora_targets(_model(model_dir), list(settings.lora_target_modules))
    started = time.monotonic()
    results: dict[str, Any] = {"settings": asdict(settings), "model": str(model_dir), "backend": backend}
    # The stages get the backend resolved: `auto` may stand for another one on another machine.
    settings = replace(settings, backend=backend)
    results["validity"] = world_validity(root, model_dir, settings)
    valid, why = gap_is_real(results["validity"])
    if not valid and not quick:
        # Comparing methods in a world without the didactic gap would measure nothing.
        logger.warning("the world's base model does not show the didactic gap (%s); the comparison "
                       "is skipped and the pipeline smoke test runs instead", why)
        write_json_atomic(root / "validity.json", {"valid": False, "why": why, **results})
        return smoke(root / "smoke")
    data = write_problems(root / "data", settings)

    rollouts: dict[str, dict[str, Any]] = {}
    selected: dict[str, str] = {}
    adapters: dict[str, list[str]] = {"base": []}
    skipped: dict[str, str] = {}
    for name, (source, loss) in METHODS.items():
        traces = None
        if source is not None:
            traces, rollouts[source] = make_traces(root, model_dir, data["train"], source, settings)
            selected[source] = traces
            if rollouts[source]["traces_selected"] == 0:
                skipped[name] = f"no {source} trace survived selection"
                continue
            traces = training_traces(traces, selected)
        adapters[name] = [train_method(root, model_dir, data["train"], traces, loss, settings, seed=seed)
                          for seed in settings.training_seeds]

    methods: dict[str, Any] = {}
    for name, trained in adapters.items():
        methods[name] = method_results(name, trained, root, model_dir, data, settings)
        source = METHODS.get(name, (None, None))[0]
        if source is not None:
            methods[name]["rollout"] = rollouts[source]
    results["methods"] = methods
    results["skipped"] = skipped
    results["rollouts"] = rollouts
    if {"mixed", "direct"} <= selected.keys():
        results["mixed_vs_direct"] = shared_traces(selected["mixed"], selected["direct"]) | {
            "same_training_data": same_training_data(selected["mixed"], selected["direct"])}
    results["minutes"] = round((time.monotonic() - started) / 60, 1)
    write_json_atomic(root / "results.json", results)
    write_text_atomic(root / "report.md", report(results))
    plot(results, root)
    logger.info("demo finished in %.1f minutes; see %s", results["minutes"], root / "report.md")
    return results


def smoke(root: Path) -> dict[str, Any]:
    """The whole pipeline (`dail run`) on the CHAMP problems with a tiny random model.

    It checks the plumbing end to end in a minute or two; a random model learns nothing.
    """
    from dail.stages import pipeline
    from dail.testing import build_tiny_model

    model_dir = root / "tiny-model"
    if not (model_dir / "config.json").exists():
        build_tiny_model(model_dir)
    config = {
        "model": {"model": str(model_dir), "device": "cpu"}, "data": "champ", "out": str(root / "run"),
        "eval_on_train": True,  # a plumbing check, not a measurement
        "sampling": {"max_new_tokens": 32, "batch_size": 64},
        "generate": {"samples": 2, "tau": 0.05},
        # A random model solves nothing, so selection keeps no trace: train on all of them.
        "train": {"loss": "dail", "traces": str(root / "run" / "generate" / "traces.jsonl"),
                  "training": {"max_steps": 8, "lora_r": 8, "dataloader_pin_memory": False}},
        "eval": {"n": 2, "budgets": [16, 32]},
    }
    results = pipeline.run(config, where="smoke demo")
    logger.info("smoke demo finished: %s", {name: r.get("pass@1") for name, r in results.items()})
    return results


# --------------------------------------------------------------------------- stages


def _stage_dir(root: Path, stage: str, settings: dict[str, Any]) -> Path:
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return root / f"{stage}-{digest}"


def gap_is_real(validity: dict[str, Any], *, high: float = 0.5, low: float = 0.2) -> tuple[bool, str]:
    """Does the base model show the gap? Known types solved, novel ones not, unless the reference is shown."""
    known = list(validity.get("known_student_pass@1", {}).values())
    novel = list(validity.get("novel", {}).values())
    if not known or not novel:
        return False, "no validity numbers"
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    checks = [
        (mean(known) >= high, f"known-type student pass@1 {mean(known):.2f} (want >= {high})"),
        (mean([n["privileged_pass@1"] for n in novel]) >= high,
         f"novel-type privileged pass@1 {mean([n['privileged_pass@1'] for n in novel]):.2f} (want >= {high})"),
        (mean([n["student_pass@1"] for n in novel]) <= low,
         f"novel-type student pass@1 {mean([n['student_pass@1'] for n in novel]):.2f} (want <= {low})"),
    ]
    failed = [text for ok, text in checks if not ok]
    return not failed, "; ".join(failed) or "ok"


def world_validity(root: Path, model_dir: Path, s: DemoSettings) -> dict[str, Any]:
    """The world's validity numbers for this model: those committed beside it, or measured (cached)."""
    from dail.world import validity

    committed = model_dir / "validity.json"
    if committed.exists():
        return json.loads(committed.read_text())
    key = {"model": _model_fingerprint(model_dir), "n": s.validity_problems, "k": s.validity_samples,
           "seed": s.seed}
    path = _stage_dir(root, "validity", key) / "validity.json"
    if path.exists():
        return json.loads(path.read_text())
    logger.info("measuring the world's validity (is the didactic gap real?)")
    model, tokenizer = validity.load(str(model_dir))
    result = validity.validity(model, tokenizer, n_problems=s.validity_problems,
                               n_samples=s.validity_samples, seed=s.seed)
    write_json_atomic(path, result)
    return result


def write_problems(folder: Path, s: DemoSettings) -> dict[str, str]:
    """Novel-type train/test problems and known-type test problems as JSONL (disjoint splits)."""
    from dail import world

    files = {
        "train": (folder / f"train-novel-{s.n_train}-{s.seed}.jsonl", "novel", "train", s.n_train),
        "test": (folder / f"test-novel-{s.n_test}-{s.seed}.jsonl", "novel", "test", s.n_test),
        "known": (folder / f"test-known-{s.n_known}-{s.seed}.jsonl", "known", "test", s.n_known),
    }
    for path, kind, split, n in files.values():
        if not path.exists():
            world.export_problems(path, split=split, kind=kind, n=n, seed=s.seed)
    train_eval = folder / f"train-eval-{s.n_train}-{s.n_train_eval}-{s.seed}-by-type.jsonl"
    if not train_eval.exists():
        lines = files["train"][0].read_text().splitlines()
        write_text_atomic(train_eval, "".join(line + "\n" for line in by_type(lines, s.n_train_eval)))
    return {name: str(path) for name, (path, *_) in files.items()} | {"train_eval": str(train_eval)}


def by_type(lines: list[str], n: int) -> list[str]:
    """The first `n` problems taken in turn from each type, so that the training problems
    evaluated mix the types as the test problems do (the file lists one type after another)."""
    groups: dict[str, list[str]] = {}
    for line in lines:
        groups.setdefault(json.loads(line)["type"], []).append(line)
    turns = [group[i] for i in range(max(map(len, groups.values()))) for group in groups.values() if i < len(group)]
    return turns[:n]


def _model(model_dir: Path) -> ModelConfig:
    return ModelConfig(model=str(model_dir), device="cpu")


def _sampling(s: DemoSettings) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=s.max_new_tokens, batch_size=s.batch_size, seed=s.seed)


def make_traces(root: Path, model_dir: Path, train_file: str, source: str,
                s: DemoSettings) -> tuple[str, dict[str, Any]]:
    """Generate and select traces from one data source; returns (selected file, summary)."""
    from dail.stages import generate

    tau, star = SOURCES[source]
    prompts = PromptConfig()
    if star:
        # STaR rationalization: the model sees the answer as a hint and writes a solution.
        hint = root / "templates" / "star_hint.txt"
        if not hint.exists():
            write_text_atomic(hint, NEGATIVE_TEMPLATE)
        prompts = PromptConfig(privileged_template=str(hint), waypoints="none")
    cfg = GenerateConfig(data=train_file, tau=s.tau if tau is None else tau, samples=s.samples,
                         grader="world", model=_model(model_dir), prompts=prompts, sampling=_sampling(s),
                         backend=s.backend)
    key = {"cfg": _cfg_key(cfg), "model": _model_fingerprint(model_dir)}
    cfg = replace(cfg, out=str(_stage_dir(root, f"traces-{source}", key)))
    summary_path = Path(cfg.out) / "generate_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else generate.run(cfg)
    selected = Path(cfg.out) / "selected.jsonl"
    style_path = Path(cfg.out) / "style.json"
    if not style_path.exists():
        write_json_atomic(style_path, trace_style(model_dir, selected))
    return str(selected), summary | json.loads(style_path.read_text())


def training_traces(traces: str, earlier: dict[str, str]) -> str:
    """The trace file to train on: an earlier source's file when it holds the same training data.

    Where mixed rollout and direct sampling write the same traces (a nearly deterministic
    privileged model), a method trained on either is the same run; training on the earlier
    file lets it share that run's cached adapters and evaluations instead of repeating them.
    """
    return next((other for other in earlier.values() if other != traces and same_training_data(other, traces)),
                traces)


def same_training_data(a: str, b: str) -> bool:
    """Whether two trace files give the same training examples in the same order (every role's
    prompt and the response tokens; rollout statistics aside)."""
    from dail.data import read_jsonl

    def examples(path: str) -> list[tuple[Any, list[int]]]:
        return [(r["prompt_ids"], r["token_ids"]) for r in read_jsonl(path)]

    return examples(a) == examples(b)


def shared_traces(a: str, b: str) -> dict[str, int]:
    """Problems kept by both trace files, and how many of them got the same traces from both.

    Where a privileged model is nearly deterministic, mixed rollout and direct sampling write
    the same tokens, and the methods trained on them see the same data.
    """
    from dail.data import group_by_problem, read_jsonl

    def by_problem(path: str) -> dict[str, list[str]]:
        return {pid: sorted(r["text"] for r in group) for pid, group in group_by_problem(read_jsonl(path)).items()}

    x, y = by_problem(a), by_problem(b)
    both = x.keys() & y.keys()
    return {"problems": len(both), "identical": sum(x[k] == y[k] for k in both)}


def trace_style(model_dir: Path, selected: Path) -> dict[str, float | None]:
    """How far a source's selected traces are from the base student's own style.

    `copied_items`: share of items written as the expert's fused line alone (the privileged
    role's style, which direct sampling inherits). `habit_lines`: share of primitive lines
    written in the privileged role's habits (`dail.world.generator.privileged_habits`; a world
    pretrained with `--habit-rate`). `student_nll`: the base student's mean
    negative log-likelihood per trace token given the student prompt (in-distribution traces
    score low).
    """
    import torch

    from dail.data import read_jsonl
    from dail.world.validity import copied_share, habit_share, load, response_logits

    records = read_jsonl(selected)
    if not records:
        return {"copied_items": None, "habit_lines": None, "student_nll": None}
    model, _ = load(str(model_dir))
    total, count = 0.0, 0
    with torch.no_grad():
        for r in records:
            prompt, response = r["prompt_ids"]["student"], r["token_ids"]
            logits = response_logits(model, prompt, response).float()
            total += torch.nn.functional.cross_entropy(logits, torch.tensor(response), reduction="sum").item()
            count += len(response)
    texts = [r["text"] for r in records]
    return {"copied_items": copied_share(texts), "habit_lines": habit_share([[t] for t in texts]),
            "student_nll": total / max(count, 1)}


def train_method(root: Path, model_dir: Path, train_file: str, traces: str | None, loss: str,
                 s: DemoSettings, *, seed: int) -> str:
    """Train one adapter with training seed `seed` (LoRA's initialisation and the order of the
    examples; cached per seed); returns its directory."""
    from dail.stages import train

    training = {"num_train_epochs": s.epochs, "learning_rate": s.learning_rate, "lora_r": s.lora_r,
                "lora_alpha": s.lora_r, "per_device_train_batch_size": s.train_batch_size,
                "gradient_accumulation_steps": s.grad_accum, "seed": seed, "save_steps": 10_000,
                "max_length": 2048, "logging_steps": 10, "dataloader_pin_memory": False}
    if s.lora_target_modules != "all-linear":  # (the default stays out of the key: caches stay valid)
        training["lora_target_modules"] = list(s.lora_target_modules) if not isinstance(
            s.lora_target_modules, str) else s.lora_target_modules
    extra = {}
    if loss == "dail":  # the other runs ignore gamma and the divergence, and keep their cache
        extra["gamma"] = s.gamma
        training["divergence"] = s.divergence
        training["teacher_cache_gb"] = 1.0  # later epochs skip both teachers' forwards (same loss)
    cfg = TrainConfig(traces=traces, data=train_file if loss == "sft" else None, loss=loss,
                      model=_model(model_dir), training=training, **extra)
    key = {"cfg": _cfg_key(cfg), "traces": _file_fingerprint(traces), "model": _model_fingerprint(model_dir)}
    cfg = replace(cfg, out=str(_stage_dir(root, f"train-{loss}", key)))
    if not (Path(cfg.out) / "train_summary.json").exists():
        train.run(cfg)
    return str(Path(cfg.out) / "adapter")


def method_results(name: str, adapters: list[str], root: Path, model_dir: Path, data: dict[str, str],
                   s: DemoSettings) -> dict[str, Any]:
    """One method's figures: for a trained method the mean over its training seeds, with a
    `spread` beside them (the same keys, each {min, max, std} over the seeds) and every seed's
    own figures in `per_seed`; the base model is evaluated once."""
    runs = [evaluate_method(root, model_dir, adapter, data, s) for adapter in adapters] or \
        [evaluate_method(root, model_dir, None, data, s)]
    means, spread = mean_and_spread(runs)
    shares = [trainable_share(adapter) for adapter in adapters]
    loss = METHODS.get(name, (None, None))[1]
    return means | {
        "spread": spread if adapters else {}, "seeds": s.training_seeds if adapters else [],
        "divergence": s.divergence if loss == "dail" else None,
        "trainable_share": shares[0] if shares else None,  # the same for every seed
        "adapters": adapters, "per_seed": runs if adapters else []}


def mean_and_spread(runs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Mean over runs of every number (walking nested mappings), and beside it, under the same
    keys, its spread {min, max, std (sample; None for one run)}. A value that is no number in
    every run is kept when all runs agree and None otherwise (bootstrap intervals of single runs,
    say, which describe no mean)."""
    means: dict[str, Any] = {}
    spread: dict[str, Any] = {}
    for key in runs[0]:
        values = [run.get(key) for run in runs]
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            means[key] = statistics.fmean(values)
            spread[key] = {"min": min(values), "max": max(values),
                           "std": statistics.stdev(values) if len(values) > 1 else None}
        elif all(isinstance(v, dict) for v in values):
            means[key], inner = mean_and_spread(values)
            if inner:
                spread[key] = inner
        else:
            means[key] = values[0] if all(v == values[0] for v in values) else None
    return means, spread


def trainable_share(adapter: str | None) -> float | None:
    """The share of the model's parameters its adapter trained (from the run's
    train_summary.json); None for the base model, and for runs cached before it was recorded."""
    if adapter is None:
        return None
    return json.loads((Path(adapter).parent / "train_summary.json").read_text()).get("trainable_share")


def evaluate_method(root: Path, model_dir: Path, adapter: str | None, data: dict[str, str],
                    s: DemoSettings) -> dict[str, Any]:
    """Test pass@k, token efficiency, retention on known types and training-set pass@k."""
    from dail.evaluation.report import pass_at_k_keys
    from dail.stages import evaluate

    def one(split: str, n: int) -> tuple[dict[str, Any], Path]:
        cfg = EvalConfig(data=data[split], adapter=adapter, n=n, grader="world", budgets=list(s.budgets),
                         model=_model(model_dir), sampling=_sampling(s), backend=s.backend)
        key = {"cfg": _cfg_key(cfg), "adapter": _file_fingerprint(adapter and f"{adapter}/adapter_model.safetensors"),
               "model": _model_fingerprint(model_dir)}
        cfg = replace(cfg, out=str(_stage_dir(root, f"eval-{split}", key)))
        path = Path(cfg.out) / "summary.json"
        return (json.loads(path.read_text()) if path.exists() else evaluate.run(cfg)), Path(cfg.out)

    (test, test_dir), (known, _), (train, _) = (
        one("test", s.eval_n), one("known", s.known_n), one("train_eval", s.train_eval_n))
    return {**{k: test[k] for k in pass_at_k_keys(test)}, "pass@k_ci": test.get("pass@k_ci"),
            "by_type": pass_at_k_by_type(test_dir, data["test"]), "mean_tokens": test["mean_tokens"],
            "accuracy_under_budget": test["accuracy_under_budget"], "retention": known["pass@1"],
            "train_pass@k": {k: train[k] for k in pass_at_k_keys(train)}}


def pass_at_k_by_type(eval_dir: Path, problems_file: str) -> dict[str, dict[str, float]]:
    """pass@1 and pass@n of each problem type, from an evaluation's graded samples."""
    from dail.data import iter_jsonl
    from dail.evaluation.report import pass_at_k_keys, summarize

    kind = {row["id"]: row["type"] for _, row in iter_jsonl(problems_file)}
    samples: dict[str, list[dict[str, Any]]] = {}
    for _, row in iter_jsonl(eval_dir / "samples.jsonl"):
        samples.setdefault(kind[row["id"]], []).append(row)
    out = {}
    for name, rows in samples.items():
        summary = summarize(rows)
        first, *_, last = pass_at_k_keys(summary)
        out[name] = {first: summary[first], last: summary[last]}
    return out


def _cfg_key(cfg: Any) -> dict[str, Any]:
    d = asdict(cfg)
    d.pop("out", None)
    return d


def _file_fingerprint(path: str | None) -> str | None:
    if not path or not Path(path).exists():
        return None
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()[:16]


def _model_fingerprint(model_dir: Path) -> str | None:
    return _file_fingerprint(str(model_dir / "model.safetensors"))
