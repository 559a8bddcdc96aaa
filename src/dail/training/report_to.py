"""Where the training curves go: the `report_to` setting, checked before any work starts.

`dail train` always records every logged value in `train_summary.json` (what `dail plot` draws);
`report_to` also streams them to TensorBoard (`<out>/tensorboard`) or Weights & Biases.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dail.config import ConfigError

#: Integration -> (modules any one of which provides it, how to install it).
INTEGRATIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard", "tensorboardX"), "pip install 'dail[tensorboard]'"),
    "wandb": (("wandb",), "pip install wandb"),
}


def report_targets(value: str | Sequence[str] | None) -> list[str]:
    """`report_to` as a list of integrations: "none" or None -> [], "a,b" -> ["a", "b"]."""
    if value is None:
        return []
    names = value.split(",") if isinstance(value, str) else list(value)
    return [n.strip() for n in names if str(n).strip() and str(n).strip() != "none"]


def check_report_to(value: Any, *, where: str = "report_to") -> list[str]:
    """The integrations asked for, each known and installed.

    Raises:
        ConfigError: an unknown name, or a package that is not installed (with the command that
            installs it).
    """
    if value is not None and not isinstance(value, str | list | tuple):
        raise ConfigError(f"{where}: expected tensorboard, wandb or none, not {value!r}")
    targets = report_targets(value)
    for name in targets:
        if name not in INTEGRATIONS:
            raise ConfigError(f"{where}: {name!r} is not one of tensorboard, wandb, none")
        modules, install = INTEGRATIONS[name]
        if not any(importlib.util.find_spec(m) is not None for m in modules):
            raise ConfigError(f"{where}: {name} is not installed; {install} (or report_to: none)")
    return targets


def send_tensorboard_to(trainer: Any, folder: Path) -> None:
    """Make the Trainer's TensorBoard callback (if any) write into `folder` instead of a folder
    named after the date and host under the checkpoints (only the main process writes)."""
    from transformers.integrations import TensorBoardCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            callback.logging_dir = str(folder)
