"""The demo's scale (`DemoSettings`, `QUICK`) and what it compares: the data sources and the
methods trained on them."""

from __future__ import annotations

from dataclasses import dataclass

from dail.config import BACKENDS, ConfigError, check_choice, check_range, resolve_divergence


@dataclass(frozen=True)
class DemoSettings:
    """Scale of the demo. Defaults follow the paper's settings except where the budget forces a change.

    Scaled down from the paper so that `make demo` fits half an hour on a 2-core CPU (all
    settings are written into the report): training problems (the paper uses 417), rollout
    samples per problem (32; one trace per problem is kept either way, and 4 samples already
    give a correct trace for nearly every problem), evaluation samples per problem (the paper's
    n is 128; 64 on test problems, so pass@k goes to k = 64; 16 on training problems) and the
    token budget (world traces are short). The learning rate is raised for the 2M-parameter
    model: at the paper's 2e-4 no adapter changed the model's behaviour on novel problems in
    5 epochs. The contrastive loss uses the forward KL, which won here over three training seeds
    (`divergence="reverse"` is the paper's). tau 0.8, gamma 0.1, 5 epochs and LoRA r = 32 are the
    paper's.
    """

    n_train: int = 200
    n_test: int = 32
    n_known: int = 16
    n_train_eval: int = 16
    samples: int = 4
    eval_n: int = 64
    train_eval_n: int = 16
    known_n: int = 4
    max_new_tokens: int = 320
    tau: float = 0.8
    gamma: float = 0.1
    epochs: float = 5.0
    learning_rate: float = 1e-3
    # Of the contrastive loss (dail.training.loss.divergence_beta). Forward, not the paper's reverse: over
    # three training seeds it taught the novel types here and the reverse KL taught nothing (docs/world.md).
    divergence: str = "forward"
    lora_r: int = 32
    lora_target_modules: str | tuple[str, ...] = "all-linear"  # the paper's seven projections on Qwen
    batch_size: int = 64
    train_batch_size: int = 1
    grad_accum: int = 4
    seed: int = 0
    seeds: int = 1  # training seeds per trained method: seed, seed + 1, ...
    validity_problems: int = 16
    validity_samples: int = 64
    budgets: tuple[int, ...] = (64, 128, 192, 256, 320)
    backend: str = "auto"  # the engine that samples traces and evaluations (`dail.rollout.backend`)

    def __post_init__(self) -> None:
        # Checked (and spelled one way, as cache keys want) before any stage runs.
        object.__setattr__(self, "divergence", resolve_divergence(self.divergence))
        check_choice("backend", self.backend, BACKENDS)
        check_range("seeds", self.seeds, low=1)
        if self.lora_r < 1:
            raise ConfigError(f"--lora-r {self.lora_r}: out of range; allowed: >= 1")
        if not isinstance(self.lora_target_modules, str):
            object.__setattr__(self, "lora_target_modules", tuple(self.lora_target_modules))

    @property
    def training_seeds(self) -> list[int]:
        """The seeds each trained method is trained with; the first is `seed`, so one seed is
        the run the demo has always made (and finds in its cache)."""
        return [self.seed + i for i in range(self.seeds)]


QUICK = DemoSettings(n_train=6, n_test=6, n_known=4, n_train_eval=4, samples=4, eval_n=4, train_eval_n=4,
                     known_n=2, max_new_tokens=320, epochs=1.0, validity_problems=1, validity_samples=64,
                     batch_size=32, budgets=(96, 192, 320))

# Data source -> (tau, use the STaR hint prompt as the "privileged" context).
SOURCES = {"mixed": (None, False), "direct": (1.0, False), "star": (1.0, True)}
# Method -> (data source or None for expert solutions, loss). "base" is not trained.
METHODS: dict[str, tuple[str | None, str]] = {
    "sft": (None, "sft"),
    "dail_nll": ("mixed", "nll"),
    "dail": ("mixed", "dail"),
    "direct_dail": ("direct", "dail"),
    "star": ("star", "nll"),
}
ALL_METHODS = ("base", *METHODS)
