"""DAIL: Distribution Aligned Imitation Learning.

Turns expert solutions into in-distribution reasoning traces (mixed-policy rollout), trains a
LoRA student on them with a contrastive KL loss, and evaluates with unbiased pass@k.
"""

__version__ = "0.1.0"
