"""What made an output: each stage's settings record, and the fingerprints in it.

Every stage writes a settings record beside its outputs (`generate_config.json`,
`train_config.json`, `eval_config.json`) before its long work starts, and refuses an output
folder whose record differs, naming the keys. A record holds the stage's config plus what a
path alone does not pin down: a fingerprint of the problems, traces or adapter it read and of
the tokenizer that made its token ids. Keys that cannot change what the folder holds (its own
path, batch sizes of decoding, where logs go) are left out of the comparison.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dail.config import ConfigError

# Settings that cannot change what a finished generate/eval part holds.
NEUTRAL_KEYS = frozenset({"out", "batch_size", "device", "dtype", "shard", "engine", "draft_length",
                          "tensor_parallel_size", "allow_other_base"})

# Training arguments that change speed, logging or checkpointing but not the adapter.
TRAIN_NEUTRAL_KEYS = NEUTRAL_KEYS | frozenset({
    "report_to", "logging_steps", "logging_dir", "logging_first_step", "logging_strategy",
    "save_steps", "save_strategy", "save_total_limit", "save_only_model", "run_name",
    "disable_tqdm", "dataloader_num_workers", "dataloader_pin_memory", "dataloader_prefetch_factor",
    "merge", "teacher_cache_gb", "loss_chunk_size", "gradient_checkpointing",
    "gradient_checkpointing_kwargs", "ddp_find_unused_parameters", "output_dir"})


def check_resumable(config_path: Path, settings: dict[str, Any], *,
                    neutral: Iterable[str] = NEUTRAL_KEYS) -> None:
    """Record a stage's settings beside its outputs; refuse to resume under other settings.

    Args:
        config_path: The record's file; its folder is the stage's output folder.
        settings: JSON-ready settings of this run.
        neutral: Keys (at any depth) whose change cannot alter the outputs.

    Raises:
        ConfigError: `config_path` exists with settings that would change the outputs.
    """
    from dail.data import write_json_atomic

    settings = canonical_paths(settings)
    if config_path.exists():
        try:
            old = canonical_paths(json.loads(config_path.read_text(encoding="utf-8")))
        except ValueError:
            old = None
        changed = sorted(differing_keys(old, settings, neutral=neutral))
        if changed:
            raise ConfigError(f"{config_path.parent} holds outputs made with other settings "
                              f"({', '.join(changed)}); use another --out, or delete it to start over")
    write_json_atomic(config_path, settings)


# Settings that name an input by its path (at any depth: `model.model`, `prompts.*_template`).
_PATH_KEYS = frozenset({"model", "data", "traces", "adapter", "samples_file", "student_template",
                        "privileged_template", "negative_template"})


def canonical_paths(settings: Any) -> Any:
    """The settings with every input path that exists spelled one way (absolute, resolved): the
    same file named relatively, absolutely or with a trailing slash is the same input."""
    if not isinstance(settings, dict):
        return settings
    out = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            value = canonical_paths(value)
        elif key in _PATH_KEYS and isinstance(value, str) and value and Path(value).exists():
            value = str(Path(value).resolve())
        out[key] = value
    return out


def for_summary(settings: dict[str, Any], neutral: Iterable[str] = NEUTRAL_KEYS) -> dict[str, Any]:
    """The settings a summary records: those its outputs depend on (no output folder, shard or
    batch size of decoding), so that runs with the same settings write the same summary
    however they were launched."""
    return without_neutral(settings, neutral)


def differing_keys(old: Any, new: Any, *, neutral: Iterable[str] = NEUTRAL_KEYS,
                   prefix: str = "") -> list[str]:
    """Dotted names of the non-neutral keys whose values differ between two records."""
    neutral = frozenset(neutral)
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new)) if k not in neutral
                for d in differing_keys(old.get(k), new.get(k), neutral=neutral, prefix=f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".") or "the whole record"]


def without_neutral(settings: Any, neutral: Iterable[str] = NEUTRAL_KEYS) -> Any:
    """The settings with neutral keys removed at every depth."""
    neutral = frozenset(neutral)
    if isinstance(settings, dict):
        return {k: without_neutral(v, neutral) for k, v in settings.items() if k not in neutral}
    return settings


def digest(value: Any, length: int = 10) -> str:
    """A short stable hash of a JSON-ready value."""
    text = json.dumps(value, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def file_fingerprint(path: str | Path, length: int = 16) -> str:
    """The SHA-256 of a file's bytes (shortened)."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()[:length]


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def weights_fingerprint(model_dir: str | Path, *, blocks: int = 64, block: int = 4096) -> str | None:
    """A hash of a model folder's weight files: their names, sizes and `blocks` evenly spaced
    `block`-byte samples of each (256 KiB of a file, whatever its size: read in a moment).

    Copies of one model agree; two fine-tunes of one architecture (a base model and its
    instruct version: the same names, shapes and headers) differ, since training changes the
    values every sample lands in. None for a folder without weight files or a hub id.
    """
    folder = Path(model_dir)
    files = sorted(p for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES) if folder.is_dir() else []
    if not files:
        return None
    sha = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        sha.update(f"{path.name}\x00{size}\x00".encode())
        with open(path, "rb") as f:
            for offset in sorted({size * i // blocks for i in range(blocks)}):
                f.seek(offset)
                sha.update(f.read(block))
    return sha.hexdigest()[:16]


def problems_fingerprint(problems: Iterable[Any]) -> str:
    """A hash of the problems as read (any source: file, folder or named dataset)."""
    return digest([p.to_dict() for p in problems], length=16)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what turns text into ids: the vocabulary and the special tokens.

    Two tokenizers with the same fingerprint give every token the same id, so token ids written
    with one are read correctly with the other.
    """
    special = {name: getattr(tokenizer, name, None) for name in ("bos_token", "eos_token", "unk_token")}
    return digest({"vocab": sorted(tokenizer.get_vocab().items()), "special": special,
                   "added": sorted(map(str, getattr(tokenizer, "added_tokens_decoder", {}).values()))},
                  length=16)


class TraceTokenizerCheck:
    """Refuses trace records whose token ids another tokenizer wrote: the fingerprint recorded
    with them, else ids beyond the vocabulary. `what` ends the message: what to do instead."""

    def __init__(self, tokenizer: Any, model: str, what: str):
        self.fingerprint, self.vocab = tokenizer_fingerprint(tokenizer), len(tokenizer)
        self.model, self.what = model, what

    def __call__(self, where: str, row: dict[str, Any], ids: Iterable[Iterable[int]]) -> None:
        from dail.data import DataError

        if row.get("tokenizer") not in (None, self.fingerprint):
            raise DataError(f"{where}: these traces were written with the tokenizer of {row.get('model')!r}, not "
                            f"that of --model {self.model} (tokenizer fingerprints {row['tokenizer']} and "
                            f"{self.fingerprint}); {self.what}")
        highest = max((max(part) for part in ids if part), default=-1)
        if highest >= self.vocab:
            raise DataError(f"{where}: token id {highest} is outside the vocabulary of --model {self.model} "
                            f"({self.vocab} tokens); these traces come from another tokenizer")


# Configuration fields that fix the shapes and meaning of a model's weights.
_ARCHITECTURE_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "num_key_value_heads", "head_dim")


def architecture(model_config: Any) -> dict[str, Any]:
    """The base model's architecture as recorded with an adapter."""
    return {k: getattr(model_config, k) for k in _ARCHITECTURE_KEYS if getattr(model_config, k, None) is not None}
