"""Stage 3: `dail eval` -- n samples per problem, graded, summarised with unbiased pass@k.

Reads top to bottom: load problems -> either score a samples file made elsewhere, or load the
model (+ adapter), sample n responses per problem from the student prompt (resumable, one part
file per problem) and grade them -> write samples.jsonl, summary.json and summary.md.
Under `accelerate launch` or `--shard i/n` each process samples its share of the problems and
the final files are written once every part exists (see `dail.distributed`).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from dail.batching import run_per_problem
from dail.config import EvalConfig, to_dict
from dail.data import (
    DataError,
    iter_jsonl,
    write_json_atomic,
    write_jsonl_atomic,
    write_text_atomic,
)

logger = logging.getLogger(__name__)


def run(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate and return the summary (also written to `<out>/summary.json`)."""
    from dail import distributed
    from dail.evaluation.report import score_samples, summarize, to_markdown
    from dail.provenance import check_resumable, for_summary
    from dail.stages import preflight

    problems = preflight.check_eval(cfg)
    gold = {p.id: p.answer for p in problems}
    shard = distributed.current_shard(cfg.shard)
    out = Path(cfg.out)
    if cfg.samples_file:
        samples = load_samples(cfg.samples_file, gold)
        out.mkdir(parents=True, exist_ok=True)  # a folder of another evaluation is refused
        check_resumable(out / "eval_config.json", eval_settings(cfg, problems, None))
    else:
        samples = sample_problems(cfg, problems, shard=shard)
        if samples is None:  # an array-job shard whose siblings are still running
            return {"shard": shard.describe(), "complete": False}
    samples = score_samples(samples, gold, grader=cfg.grader)
    summary = summarize(samples, budgets=cfg.budgets)
    # Samples made elsewhere: no model of ours made them, and they need not cover every problem.
    summary["model"] = None if cfg.samples_file else cfg.model.model
    summary["adapter"] = None if cfg.samples_file else cfg.adapter
    summary["samples_file"] = cfg.samples_file
    per_problem = Counter(s["id"] for s in samples)
    summary["samples_per_problem"] = {"min": min(per_problem.values()), "max": max(per_problem.values())}
    summary["problems_without_samples"] = sum(p.id not in per_problem for p in problems)
    if summary["problems_without_samples"]:
        logger.warning("%d of the %d problems have no sample in %s; the figures cover the other %d",
                       summary["problems_without_samples"], len(problems), cfg.samples_file, len(per_problem))
    if summary["samples_per_problem"]["min"] != summary["samples_per_problem"]["max"]:
        logger.warning("problems have %d to %d samples each; pass@k goes up to the fewest",
                       summary["samples_per_problem"]["min"], summary["samples_per_problem"]["max"])
    # What made these samples: the settings record checked before they were read or sampled.
    summary["settings"] = for_summary(json.loads((out / "eval_config.json").read_text(encoding="utf-8")))
    # The responses' token budget (unknown for samples made elsewhere): plots stop there.
    summary["max_new_tokens"] = None if cfg.samples_file else cfg.sampling.max_new_tokens
    if shard.writes_merged:  # summary.json after samples.jsonl: its presence marks completion
        write_jsonl_atomic(out / "samples.jsonl", samples)
        write_text_atomic(out / "summary.md", to_markdown(summary, title=f"Evaluation of {_source(cfg)}"))
        write_json_atomic(out / "summary.json", summary)
    distributed.barrier(shard)
    tokens = "n/a" if summary.get("mean_tokens") is None else f"{summary['mean_tokens']:.1f}"
    if "pass@1" in summary:
        logger.info("pass@1 %.4f, mean tokens %s", summary["pass@1"], tokens)
    else:
        logger.info("mean tokens %s; pass@k not reported (no problem has a gold answer)", tokens)
    return summary


def _source(cfg: EvalConfig) -> str:
    """What made the samples, in words."""
    if cfg.samples_file:
        return f"the samples in {cfg.samples_file}"
    return f"{cfg.model.model} with the adapter {cfg.adapter}" if cfg.adapter else cfg.model.model


def load_samples(path: str, gold: dict[str, str | None]) -> list[dict[str, Any]]:
    """Samples made elsewhere: JSONL with `id` and `text` (optional `sample`, `num_tokens`).

    Raises:
        DataError: a record without `id`/`text`, or an id that is not among the problems.
    """
    samples, counts = [], {}
    for where, row in iter_jsonl(path):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise DataError(f"{where}: field 'text' (the response) must be a string")
        pid = str(row.get("id", ""))
        if pid not in gold:
            raise DataError(f"{where}: field 'id': {pid!r} is not a problem in the data file")
        sample = row.get("sample", counts.get(pid, 0))
        counts[pid] = counts.get(pid, 0) + 1
        samples.append({**row, "id": pid, "sample": sample})
    if not samples:
        raise DataError(f"{path}: no samples")
    return samples


def sample_problems(cfg: EvalConfig, problems: list[Any], *,
                    shard: Any = None) -> list[dict[str, Any]] | None:
    """n samples per problem from the student prompt of the (adapted) model.

    Returns:
        All problems' samples, or None when other array-job shards are still running.
    """
    from dail import models, provenance
    from dail.rollout.backend import open_sampler, require
    from dail.rollout.prompts import encode_prompt
    from dail.rollout.rule import RolloutSettings, sequence_seed
    from dail.stages.generate import prompt_builder

    require(cfg.backend)
    tokenizer = models.load_tokenizer(cfg.model)
    if cfg.adapter:
        check_adapter(cfg.adapter, cfg.model.model, tokenizer)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    provenance.check_resumable(out / "eval_config.json", eval_settings(cfg, problems, tokenizer))

    def check(model: Any) -> None:  # before the adapter is applied or served
        models.check_compatible(model, tokenizer, name=cfg.model.model)
        if cfg.adapter:
            check_adapter(cfg.adapter, cfg.model.model, tokenizer, model=model, allow_other_base=cfg.allow_other_base)

    sampler = open_sampler(cfg.backend, cfg.model, tokenizer, adapter=cfg.adapter, check=check,
                           tensor_parallel_size=cfg.tensor_parallel_size)
    model = sampler.model
    builder = prompt_builder(cfg.prompts)
    prompts = {p.id: encode_prompt(tokenizer, builder.render(p, tokenizer)["student"]) for p in problems}
    settings = RolloutSettings(
        temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p, top_k=cfg.sampling.top_k,
        max_new_tokens=cfg.sampling.max_new_tokens, eos_ids=tuple(models.eos_token_ids(model, tokenizer)))

    def generate(rows: list[tuple[Any, int]]) -> list[dict[str, Any]]:
        traces = sampler.sample(
            [prompts[p.id] for p, _ in rows],
            [sequence_seed(cfg.sampling.seed, f"eval\x00{p.id}\x00{s}") for p, s in rows],
            settings)
        return [{"id": p.id, "sample": s, "text": tokenizer.decode(t.token_ids, skip_special_tokens=True),
                 "num_tokens": len(t.token_ids), "finished": t.finished}
                for (p, s), t in zip(rows, traces, strict=True)]

    return run_per_problem(problems, cfg.n, key=lambda p: p.id, parts=out / "parts",
                           batch_size=cfg.sampling.batch_size, generate=generate, desc="eval",
                           shard=shard)


def eval_settings(cfg: EvalConfig, problems: list[Any], tokenizer: Any | None) -> dict[str, Any]:
    """The stage's config, the problems' contents, the tokenizer and the adapter's weights."""
    from dail import provenance
    from dail.rollout.backend import resolve_backend

    record = {**to_dict(cfg), "problems_sha256": provenance.problems_fingerprint(problems)}
    if not cfg.samples_file:  # resolved: `auto` may stand for another backend on another machine
        record["backend"] = resolve_backend(cfg.backend)
    if tokenizer is not None:
        record["tokenizer"] = provenance.tokenizer_fingerprint(tokenizer)
    if cfg.samples_file:
        record["samples_sha256"] = provenance.file_fingerprint(cfg.samples_file)
    if cfg.adapter:
        weights = sorted(Path(cfg.adapter).glob("adapter_model.*"))
        record["adapter_sha256"] = provenance.file_fingerprint(weights[0]) if weights else None
    return record


def check_adapter(adapter: str, name: str, tokenizer: Any, *, model: Any = None,
                  allow_other_base: bool = False) -> None:
    """Refuse an adapter made for another base model, before any sampling.

    The base model's tokenizer, weights (unless `allow_other_base`) and architecture recorded
    beside the adapter by `dail train` must be those of `--model`, whatever path names it; with
    `model` given, every LoRA weight must also fit the layer it adapts (for adapters made
    elsewhere too).

    Raises:
        DataError: one line naming the adapter, the model it was made for and `--model`.
    """
    from dail.models import resolve_model
    from dail.provenance import architecture, tokenizer_fingerprint, weights_fingerprint
    from dail.stages.train import ADAPTER_BASE_FILE

    made_for = Path(adapter) / ADAPTER_BASE_FILE
    recorded = json.loads(made_for.read_text(encoding="utf-8")) if made_for.is_file() else {}
    base = recorded.get("base_model", "another model")
    if recorded.get("tokenizer") not in (None, tokenizer_fingerprint(tokenizer)):
        raise DataError(f"{adapter}: this adapter was trained on {base}, whose tokenizer differs from that "
                        f"of --model {name}; evaluate it with --model {base}")
    if model is None:
        return
    ours = architecture(model.config)
    differ = [f"{k} {v} vs {ours.get(k)}" for k, v in sorted(recorded.get("architecture", {}).items())
              if ours.get(k) != v]
    if differ:
        raise DataError(f"{adapter}: this adapter was trained on {base}, whose architecture differs from "
                        f"that of --model {name} ({', '.join(differ)}); evaluate it with --model {base}")
    _check_lora_shapes(adapter, name, model)
    if recorded.get("weights") and not allow_other_base:
        ours = weights_fingerprint(resolve_model(name))
        if ours is not None and ours != recorded["weights"]:
            raise DataError(f"{adapter}: this adapter was trained on {base}, whose weights differ from those of "
                            f"--model {name}; evaluate it with --model {base}, or pass --allow-other-base")


def _check_lora_shapes(adapter: str, name: str, model: Any) -> None:
    """Each saved LoRA matrix fits the layer of `model` it adapts: A is (r, in), B is (out, r)."""
    from safetensors import safe_open

    weights = Path(adapter) / "adapter_model.safetensors"
    if not weights.is_file():
        return  # PEFT reports what is missing
    layers = dict(model.named_modules())
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is no mapping)
            path, _, part = key.removeprefix("base_model.model.").rpartition(".lora_")
            # Adapters on several parameters of one module (PEFT's wrapping of fused MoE experts)
            # nest: experts.base_layer.lora_A adapts a parameter of experts.
            path = path.replace(".base_layer", "")
            if part not in ("A.weight", "B.weight"):
                continue
            layer = layers.get(path)
            if layer is None:
                raise DataError(f"{adapter}: the adapter adapts a layer {path!r} that --model {name} does "
                                f"not have; it was made for another base model")
            shape = f.get_slice(key).get_shape()
            side, size = ("in_features", shape[1]) if part == "A.weight" else ("out_features", shape[0])
            wanted = getattr(layer, side, None)
            if wanted is not None and size != wanted:
                raise DataError(f"{adapter}: {key} fits a layer of {side} {size}, but {path} of --model "
                                f"{name} has {wanted}; the adapter was made for another base model")
