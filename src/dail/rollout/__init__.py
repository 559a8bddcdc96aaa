"""Stage 1: the mixed-policy rollout that turns expert solutions into in-distribution traces.

- `prompts`: the three roles' prompts (student, privileged, negative) and the waypoints taken
  from a solution.
- `rule`: the rule itself (a student proposal is kept when the privileged context gives it a raw
  probability >= tau, else the privileged context samples), its settings and sampling.
- `mixed`: `mixed_rollout`, the entry point, which picks how the work is scheduled.
- `token_loop`: the token-by-token loop (one forward over both contexts per token) and plain
  sampling from one context.
- `engine`: the draft engine, the same traces by draft and verify with continuous batching.
"""
