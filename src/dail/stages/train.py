"""Stage 2: `dail train` -- LoRA fine-tuning with the DAIL, KL, NLL or SFT loss.

Reads top to bottom: refuse broken distributed strategies -> load examples -> record the
settings in `train_config.json` (a folder made with other settings is refused; a finished run
with the same settings is skipped) -> load model and wrap it with LoRA -> train with `DAILTrainer` (resuming from the last *complete* checkpoint, with
the same data order) -> save the adapter (and a merged model), each swapped in atomically.

Under `accelerate launch` the Trainer runs data-parallel (DDP, FSDP2, DeepSpeed ZeRO-2); the
model is loaded on the CPU and the Trainer places one replica per process. See docs/scale.md.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from dail.config import ConfigError, TrainConfig, to_dict
from dail.data import (
    DataError,
    Interrupted,
    iter_jsonl,
    load_problems,
    save_dir_atomic,
    write_json_atomic,
)
from dail.rollout.prompts import ROLES, encode_prompt

logger = logging.getLogger(__name__)


def run(cfg: TrainConfig) -> Path:
    """Train and return the adapter directory (`<out>/adapter`)."""
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    from dail import distributed, models, provenance
    from dail.rollout.vllm_backend import engine as vllm_engine
    from dail.stages import preflight
    from dail.training import report_to
    from dail.training.arguments import check_lora_targets, optimizer_steps, resolve_warmup
    from dail.training.trainer import DAILCollator, DAILTrainer

    # A stage that sampled on vLLM in this process (`dail run`, a script) left its engine
    # holding the KV cache (on a GPU, 90% of the memory): training gets it back first.
    vllm_engine.close()
    out = Path(cfg.out)
    report_to.check_report_to(cfg.training.get("report_to"), where="report_to")
    args = preflight.check_train(cfg)
    strategy = distributed.training_strategy(cfg.training)
    sharded = strategy["deepspeed_stage"] == 3 or strategy["fsdp_version"] is not None
    tokenizer = models.load_tokenizer(cfg.model)
    examples = load_examples(cfg, tokenizer, max_length=args.max_length)
    steps = optimizer_steps(args, len(examples), int(os.environ.get("WORLD_SIZE", 1)))
    warmup = resolve_warmup(args, steps, explicit="warmup_steps" in cfg.training)
    settings = train_settings(cfg, args, tokenizer)
    if record_settings(out, settings):
        logger.info("train: %s is complete with these settings, skipped", out)
        if args.merge and not (out / "merged").is_dir() and distributed.is_main_process():
            merged = _merge_from_disk(cfg, out / "adapter")
            save_dir_atomic(out / "merged", lambda d: (merged.save_pretrained(d), tokenizer.save_pretrained(d)))
        return out / "adapter"

    model = models.load_model(cfg.model, for_training=True)
    models.check_compatible(model, tokenizer, name=cfg.model.model)
    # What the adapter is made for, saved beside it: `dail eval --adapter` checks it first.
    base = {"base_model": cfg.model.model, "tokenizer": settings["tokenizer"],
            "architecture": provenance.architecture(model.config),
            "weights": provenance.weights_fingerprint(models.resolve_model(cfg.model.model))}
    check_lora_targets(model, args.lora_target_modules)
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=args.lora_target_modules,
                      task_type="CAUSAL_LM")
    set_seed(args.seed)  # LoRA's random init: the same adapter in every process and every run
    model = get_peft_model(model, lora)
    trainable = trainable_parameters(model)
    logger.info("LoRA trains %d of %d parameters: a trainable share of %.4g%%", trainable["trainable_parameters"],
                trainable["all_parameters"], 100 * trainable["trainable_share"])
    if args.gradient_checkpointing:
        model.enable_input_require_grads()

    roles = ("student", "privileged", "negative") if args.uses_negative else (
        ("student", "privileged") if args.uses_teacher else ("student",))
    trainer = DAILTrainer(model=model, args=args, train_dataset=examples,
                          data_collator=DAILCollator(tokenizer.pad_token_id, roles))
    report_to.send_tensorboard_to(trainer, out / "tensorboard")
    last = last_complete_checkpoint(Path(args.output_dir), remove_incomplete=trainer.is_world_process_zero())
    if last:
        logger.info("resuming from %s", last)
    try:
        result = trainer.train(resume_from_checkpoint=str(last) if last else None)
    except KeyboardInterrupt as e:
        if last_complete_checkpoint(Path(args.output_dir)) is None:
            every = (f" (one is saved every {args.save_steps:g} steps)"
                     if _plain(args.save_strategy) == "steps" else "")
            raise Interrupted(f"no checkpoint was saved yet{every}: rerunning the same command starts over") from e
        raise

    if sharded:
        # Sharded parameters: only the Trainer can gather them (a collective on every rank).
        staging = out / ".adapter.gathered"
        trainer.save_model(str(staging))
    if trainer.is_world_process_zero():
        if sharded:
            save_dir_atomic(out / "adapter", lambda d: (shutil.copytree(staging, d),
                                                        (d / "training_args.bin").unlink(missing_ok=True),
                                                        tokenizer.save_pretrained(d),
                                                        write_json_atomic(d / ADAPTER_BASE_FILE, base)))
            shutil.rmtree(staging, ignore_errors=True)
        else:
            save_dir_atomic(out / "adapter", lambda d: (model.save_pretrained(d),
                                                        tokenizer.save_pretrained(d),
                                                        write_json_atomic(d / ADAPTER_BASE_FILE, base)))
        if args.merge:
            merged = _merge_from_disk(cfg, out / "adapter") if sharded else model.merge_and_unload()
            save_dir_atomic(out / "merged", lambda d: (merged.save_pretrained(d),
                                                       tokenizer.save_pretrained(d)))
        write_json_atomic(out / "train_summary.json", {
            "settings": provenance.for_summary(settings, provenance.TRAIN_NEUTRAL_KEYS),
            "examples": len(examples), "loss": args.loss, "gamma": args.gamma, "divergence": args.divergence,
            **trainable,
            "effective_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps
            * settings["world_size"],
            "resumed_from": last.name if last else None,
            "optimizer_steps": steps, "warmup_steps": warmup,
            "peak_learning_rate": peak_learning_rate(trainer, args.learning_rate, steps),
            "steps": trainer.state.global_step,
            "metrics": whole_run_metrics(result.metrics, trainer.state.log_history, resumed=last is not None),
            "log_history": trainer.state.log_history,
        })
    trainer.accelerator.wait_for_everyone()  # no rank moves on before the adapter exists
    return out / "adapter"


def whole_run_metrics(metrics: dict[str, Any], log_history: list[dict[str, Any]], *, resumed: bool) -> dict[str, Any]:
    """The Trainer's end-of-run metrics, for the whole run when it was resumed: its mean loss is
    taken over every logged step (the Trainer's covers the steps since the resume), and its
    times and rates move under `since_resume`."""
    if not resumed:
        return metrics
    whole = {k: v for k, v in metrics.items() if not k.startswith("train_") or k == "train_loss"}
    whole["since_resume"] = {k: v for k, v in metrics.items() if k.startswith("train_") and k != "train_loss"}
    logged = [(row["step"], row["loss"]) for row in log_history if "loss" in row and "step" in row]
    if logged:  # each logged loss is the mean over the steps since the log before it
        spans = [step - before for (step, _), before in zip(logged, [0] + [s for s, _ in logged[:-1]], strict=True)]
        whole["train_loss"] = sum(loss * span for (_, loss), span in zip(logged, spans, strict=True)) / sum(spans)
    return whole


def peak_learning_rate(trainer: Any, learning_rate: float, steps: int) -> float | None:
    """The highest learning rate any of the run's optimizer steps used, read from its schedule
    (the rates logged are those of the step after each log); None for a schedule without one."""
    lambdas = getattr(trainer.lr_scheduler, "lr_lambdas", None)
    if not lambdas:
        return None
    return max(learning_rate * lambdas[0](step) for step in range(steps))


# Training arguments that shape the adapter, recorded with their effective values (defaults
# included); any other key the user sets is recorded too.
_EFFECTIVE_TRAINING_KEYS = (
    "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "num_train_epochs",
    "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "seed", "data_seed",
    "optim", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "bf16", "fp16",
    "divergence", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "max_length")


def train_settings(cfg: TrainConfig, args: Any, tokenizer: Any) -> dict[str, Any]:
    """What the adapter depends on: the config with every training argument at its effective
    value, the world size (it multiplies the batch), the tokenizer, and the input's contents."""
    from dail import provenance

    record = to_dict(cfg)
    keys = [k for k in (*_EFFECTIVE_TRAINING_KEYS, *cfg.training)
            if k not in provenance.TRAIN_NEUTRAL_KEYS and k not in ("loss", "gamma") and hasattr(args, k)]
    record["training"] = {k: _plain(getattr(args, k)) for k in dict.fromkeys(keys)}
    record["world_size"] = int(os.environ.get("WORLD_SIZE", 1))
    record["tokenizer"] = provenance.tokenizer_fingerprint(tokenizer)
    if cfg.loss == "sft":
        record["problems_sha256"] = provenance.problems_fingerprint(load_problems(cfg.data or cfg.traces))
    else:
        record["traces_sha256"] = provenance.file_fingerprint(cfg.traces)
    return record


def _plain(value: Any) -> Any:
    """A JSON value for a training argument (enums by their value)."""
    import enum

    return value.value if isinstance(value, enum.Enum) else value


def record_settings(out: Path, settings: dict[str, Any]) -> bool:
    """Write `train_config.json`, or check it against an earlier run's; True when that run
    finished (its summary is written after the adapter).

    Raises:
        ConfigError: the folder holds a run with other settings, or an unrecorded one.
    """
    from dail import provenance

    path = out / "train_config.json"
    earlier = (out / "adapter").is_dir() or last_complete_checkpoint(out / "checkpoints") is not None
    if not path.exists() and earlier:
        raise ConfigError(f"{out} holds a training run without a record of its settings "
                          f"(no train_config.json); use another --out, or delete it to start over")
    out.mkdir(parents=True, exist_ok=True)
    provenance.check_resumable(path, settings, neutral=provenance.TRAIN_NEUTRAL_KEYS)
    return (out / "train_summary.json").is_file() and (out / "adapter").is_dir()


def trainable_parameters(model: Any) -> dict[str, Any]:
    """Trainable parameters (the adapter's), all parameters (the adapter's included) and the
    share of the first in the second (PEFT's count): the paper's LoRA, r 32 on seven projections
    of a 7B model, trains about 0.5% of the weights, and the same rank is a much larger share of
    a small model."""
    trainable, total = model.get_nb_trainable_parameters()
    return {"trainable_parameters": trainable, "all_parameters": total,
            "trainable_share": trainable / total if total else 0.0}


# Beside adapter_config.json: the base model, tokenizer and architecture the adapter was made for.
ADAPTER_BASE_FILE = "dail_adapter.json"


_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def last_complete_checkpoint(folder: Path, *, remove_incomplete: bool = False) -> Path | None:
    """The newest checkpoint that was completely written, or None.

    The Trainer writes a checkpoint in place (weights, optimizer, RNG states, then
    `trainer_state.json` last), so a process killed while saving leaves a directory that
    `get_last_checkpoint` would pick. A checkpoint is complete when its trainer state parses and
    names its step, and its weights, optimizer and every rank's RNG state are present.

    Args:
        folder: The Trainer's output_dir.
        remove_incomplete: Delete incomplete checkpoints newer than the one returned (rank 0
            only), so the Trainer's rotation never counts them.
    """
    if not folder.is_dir():
        return None
    found = sorted(((int(m.group(1)), p) for p in folder.iterdir()
                    if p.is_dir() and (m := _CHECKPOINT.match(p.name))), reverse=True)
    for step, path in found:
        if _checkpoint_complete(path, step):
            return path
        logger.warning("ignoring incomplete checkpoint %s (the process was stopped while saving it)", path)
        if remove_incomplete:
            shutil.rmtree(path, ignore_errors=True)
    return None


def _checkpoint_complete(path: Path, step: int) -> bool:
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(state, dict) or state.get("global_step") != step:
        return False
    names = {p.name for p in path.iterdir()}
    has_weights = any(n.endswith(".safetensors") for n in names) or any(
        n.startswith(("pytorch_model_fsdp", "global_step")) for n in names)
    has_optimizer = "optimizer.pt" in names or any(n.startswith(("global_step", "optimizer_"))
                                                     for n in names)
    world = int(os.environ.get("WORLD_SIZE", 1))
    rng = {n for n in names if n.startswith("rng_state")}
    has_rng = ("rng_state.pth" in rng) if world == 1 else all(
        f"rng_state_{i}.pth" in rng for i in range(world))
    return has_weights and has_optimizer and has_rng


def _merge_from_disk(cfg: TrainConfig, adapter: Path) -> Any:
    """The saved adapter merged into a fresh CPU copy of the base (sharded training)."""
    from dataclasses import replace

    from peft import PeftModel

    from dail import models

    base = models.load_model(replace(cfg.model, device="cpu"))
    return PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()


# --------------------------------------------------------------------------- examples


def load_examples(cfg: TrainConfig, tokenizer: Any, *, max_length: int) -> list[dict[str, Any]]:
    """Training examples `{"prompt_ids": {role: ids}, "response_ids": ids}`.

    For the sft baseline the response is the expert solution (plus EOS) after the student
    prompt; for every other loss it is a synthetic trace with all three prompts.

    Raises:
        DataError: missing input file, or a trace record without the needed fields.
    """
    if cfg.loss == "sft":
        source = cfg.data or cfg.traces
        if not source:
            raise DataError("the sft loss trains on expert solutions: pass --data PROBLEMS")
        raw = _sft_examples(source, cfg, tokenizer)
    else:
        if not cfg.traces:
            raise DataError(f"the {cfg.loss} loss trains on traces: pass --traces selected.jsonl")
        raw = _trace_examples(cfg.traces, tokenizer, model=cfg.model.model)
        if not raw:
            raise DataError(f"{cfg.traces}: no traces to train on{_why_empty(Path(cfg.traces))}")
    examples = [e for e in (_fit(e, max_length) for e in raw) if e is not None]
    if not examples:
        raise DataError("no training examples left (empty input, or every prompt exceeds max_length)")
    logger.info("training on %d examples (%d dropped for length)", len(examples), len(raw) - len(examples))
    return examples


def _why_empty(traces: Path) -> str:
    """What the generate summary beside an empty traces file says of its selection."""
    from dail.stages.generate import why_rejected

    try:
        summary = json.loads((traces.parent / "generate_summary.json").read_text(encoding="utf-8"))
        budget = summary.get("settings", {}).get("sampling", {}).get("max_new_tokens")
        return f": {why_rejected(summary, budget)} ({traces.parent / 'generate_summary.json'})"
    except (OSError, ValueError, KeyError, AttributeError):
        return " (the file is empty)"


def _trace_examples(path: str, tokenizer: Any, *, model: str) -> list[dict[str, Any]]:
    from dail.provenance import TraceTokenizerCheck

    examples = []
    check_tokenizer = TraceTokenizerCheck(
        tokenizer, model, "train the model that generated them, or generate traces with this one")
    for where, row in iter_jsonl(path):
        prompt_ids = row.get("prompt_ids") if isinstance(row, dict) else None
        if not isinstance(prompt_ids, dict) or any(not _is_ids(prompt_ids.get(r)) for r in ROLES):
            raise DataError(f"{where}: field 'prompt_ids' must map student, privileged and negative "
                            f"to lists of token ids (is this a trace file from `dail generate`?)")
        if not _is_ids(row.get("token_ids")) or not row["token_ids"]:
            raise DataError(f"{where}: field 'token_ids' must be a non-empty list of token ids")
        check_tokenizer(where, row, (row["token_ids"], *(prompt_ids[r] for r in ROLES)))
        examples.append({"prompt_ids": {r: prompt_ids[r] for r in ROLES},
                         "response_ids": row["token_ids"], "id": row.get("id")})
    return examples


def _sft_examples(path: str, cfg: TrainConfig, tokenizer: Any) -> list[dict[str, Any]]:
    from dail.rollout.prompts import PromptBuilder, PromptTemplates

    p = cfg.prompts
    builder = PromptBuilder(PromptTemplates.from_files(p.student_template, p.privileged_template,
                                                       p.negative_template),
                            waypoints=p.waypoints, thinking=p.thinking, system_prompt=p.system_prompt)
    examples = []
    for problem in load_problems(path):
        prompt = builder.render(problem, tokenizer)["student"]
        prompt_ids = encode_prompt(tokenizer, prompt)
        examples.append({"prompt_ids": {"student": prompt_ids}, "response_ids": solution_ids(tokenizer, problem.solution),
                         "id": problem.id})
    return examples


def solution_ids(tokenizer: Any, solution: str) -> list[int]:
    """An expert solution as a response: its tokens, then EOS (what the sft loss trains on)."""
    return tokenizer(solution, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and t >= 0 for t in value)


def _fit(example: dict[str, Any], max_length: int) -> dict[str, Any] | None:
    """Cut the response so every role's sequence fits `max_length`; None if a prompt alone does not."""
    room = max_length - max(len(ids) for ids in example["prompt_ids"].values())
    if room <= 0:
        logger.warning("skipping %s: its prompt alone exceeds max_length=%d", example.get("id"), max_length)
        return None
    if len(example["response_ids"]) > room:
        example = {**example, "response_ids": example["response_ids"][:room]}
    return example
