"""DAIL: Distribution Aligned Imitation Learning.

Turns expert solutions into in-distribution reasoning traces (mixed-policy rollout), trains a
LoRA student on them with a contrastive KL loss, and evaluates with unbiased pass@k.

The packages follow the pipeline: `rollout` (Stage 1), `training` (Stage 2), `evaluation`, and
`stages`, whose `run(cfg)` functions the `dail` command (`cli`) calls. Below them lies the shared
ground: `config`, `data`, `models`, `distributed`, `provenance`, `batching`. `world` is the
didactic testbed; the library does not import it (only the CLI and the demo run it).
"""

__version__ = "0.1.0"
