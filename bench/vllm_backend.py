"""`python -m bench.vllm_backend`: the vLLM backend against the built-in engine, SmolLM2-135M-
Instruct on CHAMP prompts (`bench/real_model.py`), tau 0.8, temperature 0.6, top-p 0.95,
128 tokens, no end of sequence (every row runs the whole budget). Writes the `vllm` section of
bench/results.json.

A round times, back to back in one process, at one batch size:
- vllm_native: vLLM's own sampler (unseeded), the student's prompts: what plain vLLM costs;
- vllm_sampling: dail's seeded sampling on vLLM (the logits processor draws every token);
- vllm_mixed: the mixed rollout on vLLM;
- builtin_generate: `model.generate` sampling the student's prompts (the built-in baseline);
- builtin_mixed: the mixed rollout on the built-in (draft) engine.
Each ratio is the median of the rounds' own ratios:
- mixed_vs_sampling: vllm_mixed's tokens/s / vllm_native's;
- mixed_vs_builtin: vllm_mixed's tokens/s / builtin_mixed's;
- eval_vs_builtin: `dail eval`'s sampling (n = 16 samples of 4 problems, the seeded sampler)
  on vLLM / on the built-in engine, for the base model and with a LoRA adapter (r 32 on every
  projection: the built-in backend merges it, vLLM serves it);
- calls_per_token: `LLM.generate` calls per generated token of the mixed rollout (each call
  decides a whole batch, one engine step per position);
- deciding_share: the share of vllm_mixed's time spent in the logits processor (the rule);
- start_seconds: the engine's start (model load, KV cache, no compilation on a CPU).

`--only distribution` compares 256 mixed traces per backend (8 problems x 32 samples, 64 tokens),
each backend on its own seeds; `--only lora_slots` times vLLM with and without LoRA slots.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BUDGET = 128
TAU = 0.8


def _settings(**changes: Any) -> Any:
    from dail.rollout.rule import RolloutSettings

    return RolloutSettings(**{"tau": TAU, "temperature": 0.6, "top_p": 0.95, "max_new_tokens": BUDGET, **changes})


def _seeds(n: int) -> list[int]:
    from dail.rollout.rule import sequence_seed

    return [sequence_seed(0, str(i)) for i in range(n)]


def _timed(fn: Any) -> tuple[float, Any]:
    tic = time.perf_counter()
    out = fn()
    return time.perf_counter() - tic, out


def _native(llm: Any, prompts: list[list[int]]) -> Any:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.6, top_p=0.95, max_tokens=BUDGET, ignore_eos=True, detokenize=False)
    return llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)


def bench_round(model: Any, llm: Any, student: list[list[int]], privileged: list[list[int]]) -> dict[str, Any]:
    from bench.__main__ import time_generate
    from dail.rollout.engine import draft_rollout
    from dail.rollout.vllm_backend import processor, rollout

    seeds, settings = _seeds(len(student)), _settings()
    seconds: dict[str, float] = {}
    seconds["vllm_native"], _ = _timed(lambda: _native(llm, student))
    seconds["vllm_sampling"], _ = _timed(lambda: rollout.sample_responses(llm, student, seeds, settings))
    deciding = processor.DECIDING_SECONDS[0]
    seconds["vllm_mixed"], traces = _timed(lambda: rollout.mixed_rollout(llm, student, privileged, seeds, settings))
    deciding = processor.DECIDING_SECONDS[0] - deciding
    tokens = sum(len(t.token_ids) for t in traces)
    seconds["builtin_generate"] = len(student) * BUDGET / time_generate(model, student, BUDGET)
    seconds["builtin_mixed"], _ = _timed(lambda: draft_rollout(model, student, privileged, seeds, settings, pad_id=0))
    return {"seconds": seconds, "tokens": tokens, "acceptance": sum(t.sources.count("S") for t in traces) / tokens,
            "deciding_share": deciding / seconds["vllm_mixed"],
            "calls_per_token": len(rollout._admissible_groups(llm, list(zip(student, privileged, seeds, strict=True)),
                                                              settings)) / tokens}


def bench_batch(model: Any, llm: Any, tokenizer: Any, batch: int, rounds: int) -> dict[str, Any]:
    from bench.real_model import champ_prompts

    student, privileged = champ_prompts(tokenizer, batch)
    bench_round(model, llm, student[:1], privileged[:1])  # warm-up
    done = [bench_round(model, llm, student, privileged) for _ in range(rounds)]

    def ratio(numerator: str, denominator: str) -> float:
        return round(statistics.median(r["seconds"][numerator] / r["seconds"][denominator] for r in done), 3)

    last = done[-1]
    return {"batch": batch, "rounds": rounds, "acceptance": round(last["acceptance"], 3),
            "mixed_vs_sampling": ratio("vllm_native", "vllm_mixed"),
            "mixed_vs_builtin": ratio("builtin_mixed", "vllm_mixed"),
            "seeded_sampling_vs_native": ratio("vllm_native", "vllm_sampling"),
            "vllm_native_vs_generate": ratio("builtin_generate", "vllm_native"),
            "builtin_mixed_vs_generate": ratio("builtin_generate", "builtin_mixed"),
            "deciding_share": round(statistics.median(r["deciding_share"] for r in done), 3),
            "calls_per_token": last["calls_per_token"],
            "tokens_per_second": {k: round(last["tokens"] / v, 1) for k, v in last["seconds"].items()}}


def bench_eval(model: Any, tokenizer: Any, adapter: str | None, rounds: int, n: int = 16, problems: int = 4) -> float:
    """Seconds of `dail eval`'s sampling on the built-in engine / on vLLM, n samples of a few
    CHAMP problems (eos kept: responses end where the model ends them)."""
    from bench.real_model import champ_prompts
    from dail.config import ModelConfig
    from dail.models import eos_token_ids
    from dail.rollout.backend import open_sampler

    student, _ = champ_prompts(tokenizer, problems)
    prompts = [p for p in student for _ in range(n)]
    seeds, settings = _seeds(len(prompts)), _settings(eos_ids=tuple(eos_token_ids(model, tokenizer)))
    cfg = ModelConfig(model="smollm2", dtype="float32")
    builtin = open_sampler("builtin", cfg, tokenizer, adapter=adapter)
    served = open_sampler("vllm", cfg, tokenizer, adapter=adapter)
    served.sample(prompts[:1], seeds[:1], settings)  # loads the adapter
    ratios = []
    for _ in range(rounds):
        vllm_seconds, _ = _timed(lambda: served.sample(prompts, seeds, settings))
        builtin_seconds, _ = _timed(lambda: builtin.sample(prompts, seeds, settings))
        ratios.append(builtin_seconds / vllm_seconds)
    return round(statistics.median(ratios), 3)


def lora_slots(batch: int = 8) -> None:
    """Seconds of vLLM's sampling and of the vLLM mixed rollout at one batch on engines without,
    with (rank 32) and again without LoRA slots, one round each; printed only."""
    from bench.real_model import champ_prompts, smollm2
    from dail.models import resolve_model
    from dail.rollout.vllm_backend import engine, rollout

    _, tokenizer = smollm2()
    student, privileged = champ_prompts(tokenizer, batch)
    for rank in (0, 32, 0):
        llm = engine.engine(engine.EngineSpec(model=resolve_model("smollm2"), dtype="float32", max_lora_rank=rank))
        _native(llm, student[:1])  # warm-up
        sampling, _ = _timed(lambda: _native(llm, student))  # noqa: B023 (called at once)
        mixed, _ = _timed(lambda: rollout.mixed_rollout(llm, student, privileged, _seeds(batch), _settings()))  # noqa: B023
        print(json.dumps({"lora_slots": rank, "batch": batch, "vllm_sampling_seconds": round(sampling, 1),
                          "vllm_mixed_seconds": round(mixed, 1)}), flush=True)
        engine.close()


def distribution(problems: int = 8, samples: int = 32, budget: int = 64) -> dict[str, Any]:
    """The two backends' mixed traces in distribution: `problems` CHAMP problems x `samples`, each
    backend with its own seeds (so their traces are independent draws), acceptance of proposals,
    privileged share and length with 95% bootstrap intervals of each difference."""
    from bench.real_model import champ_prompts, smollm2
    from dail.evaluation.metrics import bootstrap_ratio_difference_ci
    from dail.models import eos_token_ids, resolve_model
    from dail.rollout.mixed import mixed_rollout
    from dail.rollout.rule import sequence_seed
    from dail.rollout.vllm_backend import engine, rollout
    from dail.testing import TRACE_STATISTICS

    model, tokenizer = smollm2()
    student, privileged = (
        [p for p in prompts for _ in range(samples)] for prompts in champ_prompts(tokenizer, problems))
    settings = _settings(max_new_tokens=budget, eos_ids=tuple(eos_token_ids(model, tokenizer)))

    def seeds(run: int) -> list[int]:
        return [sequence_seed(run, f"{i}\x00{s}") for i in range(problems) for s in range(samples)]

    batch = 32
    builtin_seconds, builtin = _timed(lambda: [trace for start in range(0, len(student), batch) for trace in mixed_rollout(
        model, student[start:start + batch], privileged[start:start + batch], seeds(1)[start:start + batch],
        settings, pad_id=tokenizer.pad_token_id)])
    llm = engine.engine(engine.EngineSpec(model=resolve_model("smollm2"), dtype="float32"))
    vllm_seconds, served = _timed(lambda: rollout.mixed_rollout(llm, student, privileged, seeds(2), settings))
    engine.close()
    row: dict[str, Any] = {"problems": problems, "samples": samples, "budget": budget, "seeds": "1 (built-in), 2 (vLLM)",
                           "builtin_seconds": round(builtin_seconds, 1), "vllm_seconds": round(vllm_seconds, 1)}
    for name, per_trace in TRACE_STATISTICS.items():
        pairs = {"builtin": [per_trace(t) for t in builtin], "vllm": [per_trace(t) for t in served]}
        rates = {k: sum(a for a, _ in v) / sum(b for _, b in v) for k, v in pairs.items()}
        low, high = bootstrap_ratio_difference_ci(pairs["builtin"], pairs["vllm"], resamples=2000)
        row[name] = {**{k: round(v, 4) for k, v in rates.items()}, "difference_ci95": [round(low, 4), round(high, 4)]}
    row["identical_traces"] = sum(a.token_ids == b.token_ids for a, b in zip(builtin, served, strict=True))
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.vllm_backend")
    parser.add_argument("--rounds", type=int, default=2, help="rounds at batch 1 and 8 (one at 32)")
    parser.add_argument("--only", choices=["lora_slots", "distribution"],
                        help="lora_slots: vLLM's speed at batch 8 without and with LoRA slots, printed only; "
                             "distribution: 256 mixed traces per backend on their own seeds, compared "
                             "(written to the vllm section's `distribution`)")
    args = parser.parse_args(argv)
    if args.only == "lora_slots":
        lora_slots()
        return
    path = HERE / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    if args.only == "distribution":
        row = distribution()
        row["command"] = "python -m bench.vllm_backend --only distribution"
        results.setdefault("vllm", {})["distribution"] = row
        path.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(row, indent=2))
        return
    import tempfile

    from bench.real_model import smollm2
    from dail.models import resolve_model
    from dail.rollout.vllm_backend import engine
    from dail.testing import random_lora_adapter

    started = time.perf_counter()
    model, tokenizer = smollm2()
    engine.check_available()
    with tempfile.TemporaryDirectory() as tmp:
        adapter = str(random_lora_adapter(model, Path(tmp) / "adapter", r=32, alpha=32))
        start_seconds, llm = _timed(lambda: engine.engine(engine.EngineSpec(
            model=resolve_model("smollm2"), dtype="float32")))
        rows = [bench_batch(model, llm, tokenizer, batch, args.rounds if batch < 32 else 1) for batch in (1, 8, 32)]
        evaluation = {"base": bench_eval(model, tokenizer, None, args.rounds)}
        # An engine with LoRA slots (started by the adapter's evaluation) serves adapters only.
        evaluation["adapter_r32"] = bench_eval(model, tokenizer, adapter, args.rounds)
    section = {
        "command": "python -m bench.vllm_backend" + (f" --rounds {args.rounds}" if args.rounds != 2 else ""),
        "model": "SmolLM2-135M-Instruct", "prompts": "CHAMP problems, paper's format", "budget": BUDGET, "tau": TAU,
        "vllm": __import__("vllm").__version__, "transformers": __import__("transformers").__version__,
        "mixed_vs_sampling": {str(r["batch"]): r["mixed_vs_sampling"] for r in rows},
        "mixed_vs_builtin": {str(r["batch"]): r["mixed_vs_builtin"] for r in rows},
        "eval_vs_builtin": evaluation,
        "calls_per_token": {str(r["batch"]): r["calls_per_token"] for r in rows},
        "start_seconds": round(start_seconds, 1),
        "rows": rows,
        "minutes": round((time.perf_counter() - started) / 60, 1),
    }
    if "distribution" in results.get("vllm", {}):  # its own command's
        section["distribution"] = results["vllm"]["distribution"]
    results["vllm"] = section
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in section.items() if k != "rows"}, indent=2))
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
