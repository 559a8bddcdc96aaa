"""Stage 2: LoRA training of the student on the traces with the contrastive loss.

- `loss`: the token-level losses in pure torch (contrastive KL and its divergences, NLL, and
  their chunked forms that never hold (B, T, V) logits).
- `logits`: the model's own logits from its hidden states (soft-capping, scaling), checked.
- `trainer`: `DAILTrainer` (a `transformers.Trainer` whose only change is the loss), its
  arguments `DAILConfig` and the batch collator.
- `teacher_cache`: the frozen teachers' hidden states, kept in memory after the first epoch.
- `arguments`: the Trainer's arguments from a stage config, and the LoRA targets, checked early.
- `report_to`: where the training curves go (TensorBoard, Weights & Biases).

The stage that runs it all is `dail.stages.train`.
"""

from dail.training.loss import contrastive_kl
from dail.training.trainer import DAILCollator, DAILConfig, DAILTrainer

__all__ = ["DAILCollator", "DAILConfig", "DAILTrainer", "contrastive_kl"]
