"""Sampling on vLLM: the mixed rollout, direct and student-only sampling, and evaluation.

The rule stays the built-in one (`dail.rollout.rule`): a batch-level logits processor inside
vLLM's sampler (`processor.DailLogitsProcessor`) sees every running request's logits each engine
step, draws each row's token from the same per-position table of uniforms as the built-in engine
and forces it. A mixed rollout runs a trace as two requests, the student's context and the
privileged one, decided together in one engine step per token, so no context is ever re-encoded
and a trace depends on its seed alone, as with the built-in engine.

- `engine`: starting, reusing and closing the one engine of a process, and what the CPU build
  needs (KV-cache space, cores, the spawn guard).
- `processor`: the logits processor and the per-token records of mixed traces.
- `rollout`: `mixed_rollout` and `sample_responses` with the built-in functions' signatures.
"""
