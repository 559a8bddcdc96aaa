"""Loading the base model and tokenizer, and checking that they agree.

One set of weights serves every role: the student (with a LoRA adapter when training), the
privileged student and the negative reference (adapter disabled). Nothing here downloads unless
the user names a hub model; weights load from safetensors only.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from dail.config import ModelConfig

logger = logging.getLogger(__name__)


class ModelMismatchError(ValueError):
    """Tokenizer and model disagree in a way that would corrupt generation or training."""


class ModelLoadError(ModelMismatchError):
    """A model that dail refuses to load as it stands (unsafe weights, unrequested code)."""


def resolve_device(device: str = "auto") -> torch.device:
    """The device for inference; "auto" under a launcher is this process's own GPU (LOCAL_RANK)."""
    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        from dail.distributed import local_device_index

        local = local_device_index()
        return torch.device("cuda", local % torch.cuda.device_count()) if local is not None \
            else torch.device("cuda")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """bf16 on a GPU that supports it, float32 on the CPU, unless named."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, dtype)


def load_tokenizer(cfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    check_loadable(cfg.model, trust_remote_code=cfg.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
    saved = Path(cfg.model) / "tokenizer.json"
    if saved.exists() and _pre_tokenizer(tokenizer) != json.loads(saved.read_text(encoding="utf-8")).get("pre_tokenizer"):
        # transformers 5 rebuilds some tokenizers from their model type's class (e.g. Qwen2Tokenizer),
        # replacing the saved pre-tokenizer; the saved tokenizer.json is what the model was trained with.
        from transformers import PreTrainedTokenizerFast

        logger.warning("%s: AutoTokenizer changed the saved pre-tokenizer; loading tokenizer.json as saved",
                       cfg.model)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(cfg.model)
    if tokenizer.pad_token_id is None:
        # Padding is always masked, so reusing EOS is safe; EOS itself stays a training target.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _pre_tokenizer(tokenizer: Any) -> Any:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return json.loads(backend.to_str()).get("pre_tokenizer") if backend is not None else None


def load_model(cfg: ModelConfig, *, for_training: bool = False) -> Any:
    """The base causal LM on its device, in eval mode unless it is to be trained."""
    from transformers import AutoModelForCausalLM

    check_loadable(cfg.model, trust_remote_code=cfg.trust_remote_code)
    device = resolve_device(cfg.device)
    model = AutoModelForCausalLM.from_pretrained(
        cfg.model,
        dtype=resolve_dtype(cfg.dtype, device),
        trust_remote_code=cfg.trust_remote_code,
        use_safetensors=True,
    )
    if for_training:
        return model  # the Trainer places it: one device per process
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_loadable(name: str, *, trust_remote_code: bool = False) -> None:
    """Refuse a local model directory that dail will not load as it stands.

    Weights load from safetensors only (pickle files can run code when unpickled), and code
    shipped with a model runs only with `--trust-remote-code`. Hub ids are checked by
    `from_pretrained` itself (`use_safetensors=True`).

    Raises:
        ModelLoadError: no safetensors weights beside pickle ones, no weights at all, or
            custom code (`auto_map`) without `trust_remote_code`.
    """
    path = Path(name).expanduser()
    if not path.is_dir():
        if name.startswith(("/", "./", "../", "~")) or path.exists():
            raise ModelLoadError(f"{name}: not a model directory (no such directory)")
        return
    files = [p.name for p in path.iterdir()]
    if not any(f.endswith(".safetensors") for f in files):
        pickles = sorted(f for f in files if f.endswith(_PICKLE_SUFFIXES))
        if pickles:
            raise ModelLoadError(
                f"{path}: holds only pickled weights ({', '.join(pickles[:3])}); dail loads "
                f"safetensors only, because unpickling can run arbitrary code. Convert them once, "
                f"somewhere you trust the file: load the model with transformers and call "
                f"save_pretrained(dir, safe_serialization=True)")
        raise ModelLoadError(f"{path}: no model weights (*.safetensors) in this directory")
    config = path / "config.json"
    if not trust_remote_code and config.is_file():
        try:
            auto_map = json.loads(config.read_text(encoding="utf-8")).get("auto_map")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise ModelLoadError(f"{config}: not a valid model config ({e})") from None
        if auto_map:
            raise ModelLoadError(
                f"{path}: the model ships its own Python code (auto_map in config.json), which "
                f"dail does not run unless asked; pass --trust-remote-code if you trust it")


def load(cfg: ModelConfig, *, for_training: bool = False) -> tuple[Any, Any]:
    """Model and tokenizer, checked against each other."""
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, for_training=for_training)
    check_compatible(model, tokenizer, name=cfg.model)
    return model, tokenizer


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token that ends a response: the tokenizer's EOS and the generation config's."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(extra, int):
        ids.add(extra)
    elif extra:
        ids.update(extra)
    return sorted(i for i in ids if i is not None)


def check_compatible(model: Any, tokenizer: Any, *, name: str = "model") -> list[str]:
    """Raise on a tokenizer/model mismatch; return warnings for what merely looks wrong.

    Raises:
        ModelMismatchError: the tokenizer has ids the embedding cannot hold, or no EOS.
    """
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ModelMismatchError(
            f"{name}: the tokenizer has {len(tokenizer)} tokens but the model's embedding has "
            f"{rows} rows; load the tokenizer that was saved with this model "
            f"(or resize the embeddings with model.resize_token_embeddings)")
    if tokenizer.eos_token_id is None:
        raise ModelMismatchError(
            f"{name}: the tokenizer has no EOS token, so responses could never end; "
            f"set tokenizer.eos_token and save it with the model")
    warnings = []
    if not getattr(tokenizer, "chat_template", None):
        warnings.append(f"{name}: the tokenizer has no chat template; prompts are rendered as "
                        f"plain 'User: ... Assistant:' text")
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
    if gen_eos and tokenizer.eos_token_id not in gen_eos:
        warnings.append(f"{name}: tokenizer EOS {tokenizer.eos_token!r} is not among the model's "
                        f"generation EOS ids {gen_eos}; both are treated as end of response")
    for message in warnings:
        logger.warning(message)
    return warnings
