"""The stage entry points: each a `run(cfg)` that reads top to bottom, and that the CLI calls.

- `generate`: Stage 1 over a problems file (`dail generate`): traces, selection, summary.
- `train`: Stage 2 (`dail train`): LoRA training on the traces (or on expert solutions).
- `evaluate`: sampling and scoring (`dail eval`): pass@k, token budgets, summary.
- `probe`: does Stage 1 work for this model and these problems? (`dail probe`).
- `inspect`: what each role sees for one problem (`dail inspect`).
- `pipeline`: the three stages from one YAML file, each cached by its settings (`dail run`).
- `demo`: the paper's comparison in the didactic world (`dail demo`).
- `preflight`: what each stage checks before it loads a model or writes anything.

Nothing is imported here, so that importing one stage does not import the others.
"""
