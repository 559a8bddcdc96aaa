"""`DAILTrainer`: a `transformers.Trainer` whose only change is the loss.

Model roles: the student is the base model with a LoRA adapter (the only trained weights).
The privileged student and the negative reference are the *same* base weights with the adapter
disabled, run without gradients on their own prompts. Each batch holds, for every role, the
role's prompt left-padded to a common length followed by the shared response right-padded to a
common length, so response token j sits at the same column in every role and is predicted by
the logits one column to its left.
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from dail.config import ConfigError, check_choice, check_range, resolve_divergence
from dail.data import match_umask
from dail.training.logits import check_model_head, model_head
from dail.training.loss import (
    chunked_contrastive_kl_terms,
    chunked_nll_sum,
    contrastive_kl_terms,
    nll,
)
from dail.training.teacher_cache import TeacherCache

logger = logging.getLogger(__name__)

LossMode = Literal["dail", "kl", "nll", "sft"]
# PEFT's name for every linear layer but the output head, whatever the architecture calls them
# (on Qwen: q, k, v, o, gate, up and down projections, the layers the paper adapts).
ALL_LINEAR = "all-linear"
IGNORE = -100


def has_accelerator() -> bool:
    """Whether torch sees a GPU or other accelerator (`torch.accelerator` exists from torch 2.6)."""
    accelerator = getattr(torch, "accelerator", None)
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


@dataclass
class DAILConfig(TrainingArguments):
    """Training settings: `TrainingArguments` with the release's defaults, plus DAIL's own.

    Attributes:
        loss: "dail" (contrastive), "kl" (gamma 0), "nll" (next-token loss on traces) or
            "sft" (next-token loss on the expert solutions; the baseline).
        gamma: Weight of the negative-reference term (used by "dail").
        divergence: Of both terms: "reverse" = KL(student || teacher) (the paper's, and the
            default), "forward" = KL(teacher || student), or "jsd:BETA", the generalized
            Jensen-Shannon divergence with BETA in [0, 1] (0 forward, 1 reverse;
            `dail.training.loss.divergence_beta`).
        kl_direction: The older name of `divergence`, kept for configs that use it: "reverse" or
            "forward". Read into `divergence` (and then cleared).
        lora_r / lora_alpha / lora_dropout: The LoRA adapter.
        lora_target_modules: The linear layers LoRA adapts: "all-linear" (every one but the
            output head) or a list of layer names (e.g. [q_proj, v_proj]; on GPT-NeoX
            [query_key_value, dense]); a single name may be given as a string.
        max_length: Longest sequence (any role's prompt + response); responses are cut to fit.
        merge: Also save the adapter merged into the base weights.
        loss_chunk_size: Response positions per chunk of the memory-bounded loss: the output
            projection (and the model's own logit transform, `dail.training.logits`), log-softmaxes and KL
            terms are computed from hidden states chunk by chunk
            (`dail.training.loss.chunked_contrastive_kl_terms`), never all positions' logits at once.
            0 computes full (B, T, V) logits for every role (the plain path; same results).
        teacher_cache_gb: Host memory (GiB) for the frozen teachers' response hidden states,
            kept from the first epoch so later ones skip the teachers' forwards
            (`dail.training.teacher_cache`; needs the chunked loss). 0 turns it off. A row costs
            2 x tokens x hidden x bytes per value: 1,000 traces of 2,000 tokens at hidden 1,536
            in bf16 take 11.4 GiB.
    """

    output_dir: str | None = None
    loss: str = "dail"
    gamma: float = 0.1
    divergence: str | None = None  # None: "reverse", or kl_direction when that is given
    kl_direction: str | None = None
    lora_r: int = 32
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: str | list[str] = ALL_LINEAR
    max_length: int = 12288
    merge: bool = False
    loss_chunk_size: int = 64  # 3.0% of the plain peak at 2,048 tokens x 151,936 (make bench)
    teacher_cache_gb: float = 0.0
    # The authors' release hyperparameters.
    learning_rate: float = 2e-4
    # `dail train` scales this default to at most a tenth of the run (`resolve_warmup`); below 1
    # it is a share of the run.
    warmup_steps: float = 5
    weight_decay: float = 0.01
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 4
    num_train_epochs: float = 5.0
    logging_steps: int = 1
    save_strategy: str = "steps"
    save_steps: int = 50
    save_total_limit: int | None = 2
    remove_unused_columns: bool = False
    report_to: str | list[str] = "none"

    def __post_init__(self) -> None:
        check_choice("loss", self.loss, ("dail", "kl", "nll", "sft"))
        self.divergence = resolve_divergence(self.divergence, self.kl_direction)
        self.kl_direction = None
        if self.loss == "kl":
            self.gamma = 0.0
        check_range("gamma", self.gamma, low=0)  # it weights a term that is subtracted
        check_range("loss_chunk_size", self.loss_chunk_size, low=0)  # 0 = plain full-logit loss
        check_range("teacher_cache_gb", self.teacher_cache_gb, low=0)  # 0 = no cache
        if self.teacher_cache_gb > 0 and self.loss_chunk_size == 0:
            raise ConfigError("teacher_cache_gb needs the chunked loss (loss_chunk_size > 0): "
                              "the cache holds hidden states, not full-vocabulary logits")
        self.lora_target_modules = _target_names(self.lora_target_modules)
        check_range("lora_r", self.lora_r, low=1)
        check_range("lora_alpha", self.lora_alpha, low=0, low_open=True)
        check_range("lora_dropout", self.lora_dropout, low=0, high=1, high_open=True)
        check_range("max_length", self.max_length, low=2)
        check_range("learning_rate", self.learning_rate, low=0, low_open=True)
        check_range("num_train_epochs", self.num_train_epochs, low=0, low_open=True)
        check_range("per_device_train_batch_size", self.per_device_train_batch_size, low=1)
        check_range("gradient_accumulation_steps", self.gradient_accumulation_steps, low=1)
        if not has_accelerator():
            self.dataloader_pin_memory = False  # pinned memory only serves an accelerator (else a warning)
        super().__post_init__()

    @property
    def uses_negative(self) -> bool:
        return self.loss == "dail" and self.gamma != 0

    @property
    def uses_teacher(self) -> bool:
        return self.loss in ("dail", "kl")


def _target_names(value: str | list[str]) -> str | list[str]:
    """"all-linear", or the list of layer names (one name may be given as a string)."""
    names = [value] if isinstance(value, str) else value
    if names == [ALL_LINEAR]:
        return ALL_LINEAR
    if not names or not all(isinstance(n, str) and n and n != ALL_LINEAR for n in names):
        raise ConfigError(f"lora_target_modules {value!r}: must be {ALL_LINEAR} or a list of linear layer names")
    return list(names)


class DAILCollator:
    """Pads examples into per-role tensors with the response at a common column.

    An example is `{"prompt_ids": {role: [ids]}, "response_ids": [ids]}`. The batch holds
    `<role>_input_ids` and `<role>_attention_mask` (B, P_role + T) for each role present,
    `response_mask` (B, T) and `labels` (B, T): the response ids, -100 on padding.
    """

    def __init__(self, pad_id: int, roles: tuple[str, ...]):
        self.pad_id = pad_id
        self.roles = roles

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(e["response_ids"]) for e in examples)
        batch: dict[str, torch.Tensor] = {}
        for role in self.roles:
            prompt_width = max(len(e["prompt_ids"][role]) for e in examples)
            ids = torch.full((len(examples), prompt_width + width), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, e in enumerate(examples):
                prompt, response = e["prompt_ids"][role], e["response_ids"]
                start = prompt_width - len(prompt)
                ids[i, start:prompt_width] = torch.tensor(prompt, dtype=torch.long)
                ids[i, prompt_width:prompt_width + len(response)] = torch.tensor(response, dtype=torch.long)
                mask[i, start:prompt_width + len(response)] = 1
            batch[f"{role}_input_ids"], batch[f"{role}_attention_mask"] = ids, mask
        labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
        for i, e in enumerate(examples):
            labels[i, :len(e["response_ids"])] = torch.tensor(e["response_ids"], dtype=torch.long)
        batch["labels"] = labels
        # Counted as-is by the Trainer for `num_items_in_batch` (already aligned, no shift).
        batch["shift_labels"] = labels
        batch["response_mask"] = (labels != IGNORE).long()
        return batch


def response_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor], role: str) -> torch.Tensor:
    """Logits that predict each response token in `role`'s context. Returns (B, T, V).

    The sequence is [prompt (left-padded to P) | response (right-padded to T)]; column P-1+j
    predicts response token j, so we keep the last T+1 columns and drop the final one.
    """
    inputs, width = _role_inputs(batch, role)
    return model(**inputs, logits_to_keep=width + 1).logits[:, :-1, :]


def _role_inputs(batch: dict[str, torch.Tensor], role: str) -> tuple[dict[str, torch.Tensor | bool], int]:
    """Forward arguments of `role`'s rows (positions count valid slots only) and the response width."""
    ids, attention = batch[f"{role}_input_ids"], batch[f"{role}_attention_mask"]
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    inputs = {"input_ids": ids, "attention_mask": attention, "position_ids": positions, "use_cache": False}
    return inputs, batch["response_mask"].shape[1]


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside DDP/FSDP/DeepSpeed (`.module`) and PEFT wrappers."""
    inner = getattr(model, "module", model)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def _decoder(model: torch.nn.Module) -> torch.nn.Module | None:
    """The body of a causal LM (the module whose output is the final-normed hidden state);
    None if it cannot be found."""
    lm = _causal_lm(model)
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else None
    return decoder if decoder is not None and decoder is not lm else None


def response_hidden(model: torch.nn.Module, batch: dict[str, torch.Tensor], role: str) -> torch.Tensor:
    """Final hidden states (after the last norm) that predict the response tokens: (B, T, H).

    The same columns as `response_logits`, without the output projection (applied chunk-wise by
    the loss). LoRA layers in the body are active unless the caller disabled the adapter. The
    call goes through `model` itself, so a DDP/FSDP wrapper sees the forward it must see before
    the backward; only the last position's logits are computed. The body's output is taken by a
    forward hook: `output_hidden_states=True` would keep every layer's output alive until the
    forward returns, which in a no-grad teacher forward is memory nothing else needs.
    """
    return response_states(model, batch, role)[0]


def response_states(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                     role: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`response_hidden`, and the last column's hidden state (B, H) with the logits (B, V) the
    model computed from it (to check the loss's head against)."""
    inputs, width = _role_inputs(batch, role)
    decoder = _decoder(model)
    if decoder is None:  # the last entry of hidden_states is after the final norm
        out = model(**inputs, logits_to_keep=1, output_hidden_states=True)
        hidden = out.hidden_states[-1]
    else:
        captured: list[torch.Tensor] = []
        hook = decoder.register_forward_hook(
            lambda _module, _args, output: captured.append(output[0]))
        try:
            out = model(**inputs, logits_to_keep=1)
        finally:
            hook.remove()
        hidden = captured[-1]
    return hidden[:, -(width + 1):-1, :], hidden[:, -1], out.logits[:, -1]


class DAILTrainer(Trainer):
    """Trainer for the DAIL losses; overrides `compute_loss` only (plus logging of its terms)."""

    args: DAILConfig
    # The loss below divides by the tokens of the whole accumulated batch itself.
    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # Make the Trainer count response tokens across the accumulated batch (and devices).
        self.model_accepts_loss_kwargs = True
        self._term_sums: dict[str, float] = defaultdict(float)
        self._term_counts: dict[str, int] = defaultdict(int)
        self._scale = 1
        self._teacher_cache = (TeacherCache(int(self.args.teacher_cache_gb * 2**30))
                               if self.args.teacher_cache_gb > 0 and self.args.uses_teacher else None)
        self._cache_lookups = {"hit": 0, "miss": 0}

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        # Weights and optimizer states are written readable by their owner alone; a checkpoint
        # gets the user's umask like every other output.
        folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.is_world_process_zero() and folder.is_dir():
            match_umask(folder)

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor],
                     return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
        mask = inputs["response_mask"]
        num_tokens = mask.sum() if num_items_in_batch is None else num_items_in_batch
        num_tokens = torch.clamp(torch.as_tensor(num_tokens, dtype=torch.float32, device=mask.device), min=1.0)
        # num_items_in_batch counts every process's tokens while DDP averages gradients, so each
        # process's share is scaled back up (as the Trainer does for models that take it).
        self._scale = (self.accelerator.num_processes
                       if self.args.average_tokens_across_devices and num_items_in_batch is not None else 1)
        if self.args.loss_chunk_size > 0:
            loss, outputs = self._chunked_loss(model, inputs, mask, num_tokens), {}
        else:
            loss, outputs = self._full_logit_loss(model, inputs, mask, num_tokens)
        loss = loss * self._scale
        return (loss, outputs) if return_outputs else loss

    def _full_logit_loss(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], mask: torch.Tensor,
                         num_tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss from (B, T, V) logits of every role (`loss_chunk_size=0`)."""
        student = response_logits(model, inputs, "student")  # (B, T, V), with gradients
        if not self.args.uses_teacher:
            loss = nll(student, inputs["labels"], mask, num_tokens=num_tokens)
            self._record("nll", loss)
            return loss, {"logits": student}
        privileged, negative = self._teacher_logits(model, inputs)
        positive_sum, negative_sum = contrastive_kl_terms(
            student, privileged, negative, mask, divergence=self.args.divergence)
        self._record("kl_privileged", positive_sum / num_tokens)
        if negative is not None:
            self._record("kl_negative", negative_sum / num_tokens)
        return (positive_sum - self.args.gamma * negative_sum) / num_tokens, {"logits": student}

    def _chunked_loss(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], mask: torch.Tensor,
                      num_tokens: torch.Tensor) -> torch.Tensor:
        """The same loss from hidden states, applying the (maybe LoRA-wrapped) head chunk-wise."""
        keep = mask.bool()
        student, last_hidden, last_logits = response_states(model, inputs, "student")
        student = student[keep]  # (N, H), with gradients
        lm = _causal_lm(self.accelerator.unwrap_model(model))
        head = model_head(lm)  # the (maybe LoRA-wrapped) head and the model's logit transform
        check_model_head(head, last_hidden, last_logits, model_type=lm.config.model_type)
        chunk = self.args.loss_chunk_size
        if not self.args.uses_teacher:
            loss = chunked_nll_sum(student, inputs["labels"][keep], head, chunk_size=chunk) / num_tokens
            self._record("nll", loss)
            return loss
        privileged, negative = self._teacher_hidden(model, inputs, keep)  # (N, H) each
        teacher_head = model_head(lm, getattr(head.head, "get_base_layer", lambda: head.head)())
        combined, positive_sum, negative_sum = chunked_contrastive_kl_terms(
            student, privileged, negative, head, gamma=self.args.gamma, divergence=self.args.divergence,
            chunk_size=chunk, teacher_head=teacher_head)
        self._record("kl_privileged", positive_sum / num_tokens)
        if negative is not None:
            self._record("kl_negative", negative_sum / num_tokens)
        return combined / num_tokens

    @torch.no_grad()
    def _teacher_hidden(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor],
                        keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Privileged and negative-reference hidden states at the kept response positions, from
        the teacher cache when every role's rows are there (on every process if the model is
        sharded: its forward is a collective, so all processes skip it or none), else from
        forwards."""
        roles = ["privileged"] + (["negative"] if self.args.uses_negative else [])
        cache, cached = self._teacher_cache, {}
        if cache is not None:
            keys = {role: cache.row_keys(inputs, role) for role in roles}
            cached = {role: cache.lookup(keys[role]) for role in roles}
            hit = all(rows is not None for rows in cached.values())
            if self.is_fsdp_enabled:  # (ZeRO-3, the other sharding, is refused with a teacher loss)
                hit = self._on_every_process(hit)
            self._cache_lookups["hit" if hit else "miss"] += 1
            cached = cached if hit else {}
        states: dict[str, torch.Tensor] = {}
        fresh: list[tuple[bytes, torch.Tensor]] = []
        base = self.accelerator.unwrap_model(model)
        with _adapter_disabled(base):
            for role in roles:
                if cached:
                    states[role] = torch.cat(cached[role]).to(keep.device)
                    continue
                hidden = response_hidden(base, inputs, role)
                if cache is not None:
                    rows = [row[row_keep].cpu() for row, row_keep in zip(hidden, keep, strict=True)]
                    fresh += zip(keys[role], rows, strict=True)
                states[role] = hidden[keep]
        if cache is not None:
            self._keep_everywhere(fresh)
        return states["privileged"], states.get("negative")

    def _keep_everywhere(self, fresh: list[tuple[bytes, torch.Tensor]]) -> None:
        """Add the rows computed here, and under several processes every other process's too:
        the sampler deals rows out afresh each epoch, so a row comes back to another process."""
        if self.accelerator.num_processes > 1:  # every process calls this every step
            everyone: list[Any] = [None] * self.accelerator.num_processes
            torch.distributed.all_gather_object(everyone, fresh)
            fresh = [row for rows in everyone for row in rows]
        self._teacher_cache.add(fresh)

    def _on_every_process(self, flag: bool) -> bool:
        if self.accelerator.num_processes == 1:
            return flag
        votes = self.accelerator.gather(torch.tensor([float(flag)], device=self.accelerator.device))
        return bool(votes.min() > 0)

    @torch.no_grad()
    def _teacher_logits(self, model: torch.nn.Module,
                        inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Privileged and negative-reference logits: the same weights, adapter disabled."""
        base = self.accelerator.unwrap_model(model)
        with _adapter_disabled(base):
            privileged = response_logits(base, inputs, "privileged")
            negative = response_logits(base, inputs, "negative") if self.args.uses_negative else None
        return privileged, negative

    def _record(self, name: str, value: torch.Tensor) -> None:
        # Per micro-batch contributions add up to the accumulated-batch value (this process's
        # share, scaled like the loss so that it estimates the all-process value).
        self._term_sums[name] += float(value.detach()) * self._scale
        self._term_counts[name] += 1

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._term_counts:
            steps = max(1, self.args.gradient_accumulation_steps)
            for name, total in self._term_sums.items():
                logs[name] = round(total / self._term_counts[name] * steps, 6)
            self._term_sums.clear()
            self._term_counts.clear()
        if "loss" in logs and self._teacher_cache is not None:
            lookups = sum(self._cache_lookups.values())
            logs["teacher_cache_hit_rate"] = round(self._cache_lookups["hit"] / max(1, lookups), 4)
            logs["teacher_cache_mib"] = round(self._teacher_cache.used_bytes / 2**20, 3)
            self._cache_lookups = {"hit": 0, "miss": 0}
        super().log(logs, *args, **kwargs)


@contextlib.contextmanager
def _adapter_disabled(model: torch.nn.Module):
    """The frozen base model: PEFT's `disable_adapter`, or nothing for a plain model."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield
    else:
        yield
