"""`make bench` / `python -m bench [--quick]`: ratios measured in one run, printed and saved.

Every figure is a ratio of two measurements taken in the same process, back to back, so that
background load on the machine cancels out as far as possible: a round times every engine in
turn, and a ratio is the median of the rounds' own ratios (three rounds at batch 64 and at
least seven below, two and five with --quick; rows of the fast world model at batch 1 and 8 run
more rounds until they have taken 10 s, 3 s with --quick; "spread" is the largest max/min ratio
of one engine's rounds). Every rollout, the engines' and the baselines', runs under
`torch.inference_mode` (as `dail.rollout` does), so the ratios compare schedules alone.
Writes bench/results.json.

- rollout_vs_sampling: tokens/s of the mixed rollout (default engine) / tokens/s of
  `model.generate` sampling the student alone (same prompts, temperature 0.6, top-p 0.95, batch,
  budget; no eos so every row runs the full budget). The world model is given the demo's own
  prompts (novel-type problems, the expert's solution in the privileged one); SmolLM2-135M-Instruct
  CHAMP's problems with their human solutions (`bench/real_model.py`).
- rollout_vs_reference: tokens/s of the default engine / the straightforward loop, one KV-cached,
  batched forward per role per token (`two_pass_rollout` below; the same traces). The draft-and-
  verify engine is measured against both and reported beside them.
- double_rows_cost (column 2B/B): seconds of one KV-cached decoding forward over the batch's
  student prompts twice (2B rows) / over them once (B rows), in the same rounds. A mixed rollout
  reads two contexts per token, so at draft length 1, if the forwards were all that cost time,
  it would run at 1 / this of sampling's speed and 2 / this of the two-pass loop's.
- unasked_share: the share of tokens the draft engine decided without running the student
  (privileged rounds: no token could pass tau there; see `dail.rollout.engine`).
- guessed_share: the share of tokens decided by right lookup guesses (lookup rounds, `dail.rollout.engine`).
- lookup: the default engine's time with lookup rounds turned off / on, world model at batch 1
  and 4 (lookup rounds run on batches of at most `dail.rollout.engine.loop.LOOKUP_ROWS` rows), budget 256 (the demo's traces run to about 210 tokens), interleaved rounds.
- prefill_share: the share of the default engine's time spent encoding both roles' prompts;
  sampling encodes only the student's, so this share is lost against it. It shrinks as the
  budget grows: real traces run to thousands of tokens, these rows to 32-64.
- inference_mode: the default engine's time under `torch.no_grad` / under `torch.inference_mode`
  (which every rollout uses), world model at batch 1 and 8, interleaved rounds.
- real_model: the rows of SmolLM2-135M-Instruct (rollout at batch 1, 8 and 32, budget 128; tau
  0.8 and 0), prompt sharing (`shared_prompts_speedup`, see `bench/real_model.py`), its train
  step and its loss memory at its vocabulary (49,152).
- train_step: on SmolLM2-135M-Instruct (LoRA r 32 on the seven projections), seconds of a DAIL step (loss + backward, chunked loss) / an NLL step, same batch,
  without gradient checkpointing and (`with_checkpointing`) with it, as the trainer runs on a
  GPU. Its `floor` is (NLL step + the two teachers' forwards, logits included) / NLL step: what
  the ratio would be if the contrastive loss itself cost no more than the NLL. `cached_ratio` is
  the DAIL step with the teacher cache filled (`teacher_cache_gb`: any epoch after the first)
  / the NLL step. All are medians of per-round ratios (a round times the steps and the
  teachers back to back).
- loss_memory: peak RSS growth of the contrastive loss + backward, chunked / unchunked, each in
  a fresh subprocess (VmHWM minus VmRSS before the measured call) whose allocator returns every
  freed tensor to the system (`STEADY_MALLOC`), so that RSS follows live tensor bytes.
- teacher_memory: peak RSS growth of one no-grad teacher forward as the trainer runs it
  (`response_hidden`: the body's output taken by a hook) / the same forward asked for
  `output_hidden_states=True`, which holds every layer's output; fresh subprocess each, as above.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
logger = logging.getLogger("bench")
HERE = Path(__file__).resolve().parent


# --------------------------------------------------------------------------- models


def random_qwen2(hidden: int, layers: int, vocab: int, seed: int = 0) -> torch.nn.Module:
    """A random Qwen2 of the given size (float32, eval mode)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3,
                         num_hidden_layers=layers, num_attention_heads=max(2, hidden // 64),
                         num_key_value_heads=max(1, hidden // 128), max_position_embeddings=4096,
                         tie_word_embeddings=False, pad_token_id=0, eos_token_id=None, bos_token_id=None)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).eval()


def demo_model() -> tuple[torch.nn.Module, str]:
    """The world model when its assets exist, else a random Qwen2 of the demo's size."""
    assets = Path(__file__).resolve().parents[1] / "src" / "dail" / "world" / "assets" / "base"
    if (assets / "config.json").exists():
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(assets).eval(), "world base model"
    return random_qwen2(256, 4, 512), "random Qwen2 (demo size; world assets absent)"


def params(model: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M"


# --------------------------------------------------------------------------- rollout


def world_prompts(batch: int) -> tuple[list[list[int]], list[list[int]]]:
    """The demo's own prompts: novel-type training problems, student and privileged (with the
    expert's solution), as the world model's rollouts in the demo see them."""
    from dail import world
    from dail.rollout.prompts import PromptBuilder
    from dail.world.tokenizer import load_tokenizer

    tokenizer, builder = load_tokenizer(str(world.base_model_dir())), PromptBuilder()
    rendered = [builder.render(p, tokenizer) for p in world.problems("novel", split="train", n=batch)]
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    return [encode(r["student"]) for r in rendered], [encode(r["privileged"]) for r in rendered]


def prompts(batch: int, vocab: int, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """Random student prompts of 24 tokens and privileged prompts of 96 (problem + solution)."""
    g = torch.Generator().manual_seed(seed)
    student, privileged = [], []
    for _ in range(batch):
        problem = torch.randint(3, vocab, (23,), generator=g).tolist()
        solution = torch.randint(3, vocab, (72,), generator=g).tolist()
        student.append(problem + [1])
        privileged.append(problem + solution + [1])
    return student, privileged


@torch.inference_mode()  # as the engine runs: the ratios compare schedules, not autograd modes
def two_pass_rollout(model, student, privileged, seeds, settings, *, pad_id: int) -> list[Any]:
    """The straightforward mixed rollout: a separate KV-cached forward per role per token."""
    from dail.rollout.rule import (
        PRIVILEGED,
        STUDENT,
        Trace,
        choose,
        sampling_distribution,
        uniform_table,
    )
    from dail.rollout.token_loop import _Decoder

    s_dec, p_dec = _Decoder(model, student, pad_id), _Decoder(model, privileged, pad_id)
    table = uniform_table(seeds, settings, s_dec.logits.device)
    traces = [Trace() for _ in seeds]
    for step in range(settings.max_new_tokens):
        s_dist, p_dist = sampling_distribution(s_dec.logits, settings), sampling_distribution(p_dec.logits, settings)
        chosen, proposal, prob, accepted = choose(s_dist, p_dist, torch.softmax(p_dec.logits, -1),
                                                  table[:, step], settings)
        for i, trace in enumerate(traces):
            trace.token_ids.append(int(chosen[i]))
            trace.sources.append(STUDENT if accepted[i] else PRIVILEGED)
        s_dec.step(chosen)
        p_dec.step(chosen)
    return traces


def time_rollout(model, student, privileged, settings, engine: str) -> tuple[float, Any]:
    """tokens/s of one engine: "draft", "reference" (one forward for both roles) or "two_pass"."""
    from dail.rollout.engine import EngineStats, draft_rollout
    from dail.rollout.rule import sequence_seed
    from dail.rollout.token_loop import reference_rollout

    seeds = [sequence_seed(0, str(i)) for i in range(len(student))]
    stats = EngineStats()
    tic = time.perf_counter()
    if engine == "draft":
        traces = draft_rollout(model, student, privileged, seeds, settings, pad_id=0, stats=stats)
    elif engine == "two_pass":
        traces = two_pass_rollout(model, student, privileged, seeds, settings, pad_id=0)
    else:
        traces = reference_rollout(model, student, privileged, seeds, settings, pad_id=0)
    seconds = time.perf_counter() - tic
    return sum(len(t.token_ids) for t in traces) / seconds, (stats, traces)


def time_generate(model, student, budget: int) -> float:
    from dail.rollout.token_loop import left_pad

    ids, mask = left_pad(student, 0, torch.device("cpu"))
    tic = time.perf_counter()
    with torch.inference_mode():  # generate itself only turns gradients off
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=0.6, top_p=0.95,
                             top_k=0, max_new_tokens=budget, min_new_tokens=budget, pad_token_id=0)
    return (out.shape[1] - ids.shape[1]) * ids.shape[0] / (time.perf_counter() - tic)


@torch.inference_mode()
def time_decoding_forward(model, prompts: list[list[int]], repeats: int = 7) -> float:
    """Median seconds of one KV-cached one-token forward over these rows (a decoding step)."""
    from dail.models import returned_cache, with_cache
    from dail.rollout.token_loop import left_pad

    ids, mask = left_pad(prompts, 0, torch.device("cpu"))
    cache = returned_cache(model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True))
    times = []
    for _ in range(repeats + 1):  # the first one warms up
        tic = time.perf_counter()
        model(input_ids=ids[:, -1:], attention_mask=mask, **with_cache(model, cache), use_cache=True)
        times.append(time.perf_counter() - tic)
        cache.crop(-1)  # drop the slot this forward appended
    return statistics.median(times[1:])


def _median_ratio(numerators: list[float], denominators: list[float]) -> float:
    """The median of the rounds' own ratios."""
    return round(statistics.median(a / b for a, b in zip(numerators, denominators, strict=True)), 3)


def bench_rollout(model, name: str, batches: list[int], budget: int, taus: list[float],
                  repeats: int, make_prompts: Callable[[int], Any] | None = None,
                  min_seconds: float = 0.0) -> list[dict[str, Any]]:
    """A round times every engine once, in turn, so that a burst of background load hits all of
    them alike; `repeats` rounds at batches above 8, 2 * repeats + 1 below, and at batches up to
    8 more rounds until the row has taken `min_seconds` (quick rows are the noisiest)."""
    from dail.rollout.rule import RolloutSettings

    rows = []
    vocab = model.config.vocab_size
    for batch in batches:
        student, privileged = make_prompts(batch) if make_prompts else prompts(batch, vocab)
        time_generate(model, student[:1], 4)  # warm-up
        for tau in taus:
            settings = RolloutSettings(tau=tau, temperature=0.6, top_p=0.95, max_new_tokens=budget)
            # The default engine is timed on its own only when it is not the draft engine.
            engines = ["two_pass", "draft"] + ([settings.engine] if settings.engine != "draft" else [])
            speeds: dict[str, list[float]] = {"sampling": [], **{e: [] for e in engines}}
            traces: dict[str, Any] = {}
            double_rows: list[float] = []  # a decoding forward over 2B rows / over B rows
            rounds = repeats if batch > 8 else 2 * repeats + 1  # small batches are quick and noisier
            started = time.perf_counter()
            while len(double_rows) < rounds or (batch <= 8 and time.perf_counter() - started < min_seconds):
                double_rows.append(time_decoding_forward(model, student + student)
                                   / time_decoding_forward(model, student))
                speeds["sampling"].append(time_generate(model, student, budget))
                for engine in engines:
                    speed, traces[engine] = time_rollout(model, student, privileged, settings, engine)
                    speeds[engine].append(speed)
            tok_s = {engine: statistics.median(values) for engine, values in speeds.items()}
            default, sampling, two_pass = tok_s[settings.engine], tok_s["sampling"], tok_s["two_pass"]
            stats = traces["draft"][0]
            per_row = zip(*(traces[engine][1] for engine in engines), strict=True)
            same = sum(all(t.token_ids == row[0].token_ids for t in row) for row in per_row) / batch
            rows.append({"model": name, "batch": batch, "tau": tau, "budget": budget, "repeats": len(double_rows),
                         "default_engine": settings.engine, "sampling_tok_s": round(sampling, 1),
                         "default_tok_s": round(default, 1), "two_pass_tok_s": round(two_pass, 1),
                         "draft_tok_s": round(tok_s["draft"], 1),
                         "vs_sampling": _median_ratio(speeds[settings.engine], speeds["sampling"]),
                         "vs_reference": _median_ratio(speeds[settings.engine], speeds["two_pass"]),
                         "draft_vs_reference": _median_ratio(speeds["draft"], speeds["two_pass"]),
                         "spread": round(max(max(v) / min(v) for v in speeds.values()), 2),
                         "double_rows_cost": round(statistics.median(double_rows), 3),
                         "acceptance": round(stats.acceptance_rate, 3),
                         "draft_length": round(stats.mean_draft_length, 2), "identical_traces": same,
                         "prefill_share": round(stats.prefill_share, 3),
                         "unasked_share": round(stats.unasked / stats.tokens, 3) if stats.tokens else 0.0,
                         "guessed_share": round(stats.guessed_right / stats.tokens, 3) if stats.tokens else 0.0,
                         "round_tok_s": {e: [round(v, 1) for v in values] for e, values in speeds.items()}})
            logger.info("%s", rows[-1])
    return rows


def _time_engine_in(model, batches: list[int], budget: int, rounds: int, make_prompts: Callable[[int], Any] | None,
                    slower: Callable[[], Any], faster: Callable[[], Any]) -> tuple[dict[str, float], bool, dict]:
    """The default engine (without its own decorator) run inside two contexts, same prompts and
    seeds, interleaved rounds (the first warms up). Returns, per batch, the median round's time
    ratio slower / faster, whether both contexts gave the same tokens throughout, and per batch
    the last stats of the faster one."""
    from dail.rollout.engine import EngineStats, draft_rollout
    from dail.rollout.rule import RolloutSettings, sequence_seed

    settings = RolloutSettings(tau=0.8, temperature=0.6, top_p=0.95, max_new_tokens=budget)
    engine = inspect.unwrap(draft_rollout)
    ratios, stats, same = {}, {}, True
    for batch in batches:
        student, privileged = make_prompts(batch) if make_prompts else prompts(batch, model.config.vocab_size)
        seeds = [sequence_seed(0, str(i)) for i in range(batch)]
        times: dict[Callable[[], Any], list[float]] = {slower: [], faster: []}
        for _ in range(rounds + 1):
            tokens = []
            for context, spent in times.items():
                stats[str(batch)] = EngineStats()
                with context():
                    tic = time.perf_counter()
                    traces = engine(model, student, privileged, seeds, settings, pad_id=0, stats=stats[str(batch)])
                    spent.append(time.perf_counter() - tic)
                tokens.append([t.token_ids for t in traces])
            same = same and tokens[0] == tokens[1]
        ratios[str(batch)] = _median_ratio(times[slower][1:], times[faster][1:])
    return ratios, same, stats


@contextlib.contextmanager
def _without_lookup_rounds():
    """The engine as it runs (inference mode), with no batch small enough for lookup rounds."""
    from dail.rollout.engine import loop

    limit, loop.LOOKUP_ROWS = loop.LOOKUP_ROWS, 0
    try:
        with torch.inference_mode():
            yield
    finally:
        loop.LOOKUP_ROWS = limit


def bench_lookup(model, batches: list[int], budget: int, rounds: int,
                 make_prompts: Callable[[int], Any] | None = None) -> dict[str, Any]:
    """The default engine's time without lookup rounds / with them (the default); per batch,
    the median round, and the share of tokens right guesses decided."""
    ratios, same, stats = _time_engine_in(model, batches, budget, rounds, make_prompts,
                                          _without_lookup_rounds, torch.inference_mode)
    shares = {b: round(s.guessed_right / s.tokens, 3) for b, s in stats.items()}
    return {"speedup": ratios, "guessed_share": shares, "same_traces": same, "budget": budget, "rounds": rounds}


def bench_inference_mode(model, batches: list[int], budget: int, rounds: int,
                         make_prompts: Callable[[int], Any] | None = None) -> dict[str, Any]:
    """The default engine's time under `torch.no_grad` / under `torch.inference_mode` (what the
    rollouts run in); per batch, the median round."""
    ratios, same, _ = _time_engine_in(model, batches, budget, rounds, make_prompts,
                                      torch.no_grad, torch.inference_mode)
    return {"speedup": ratios, "same_traces": same, "rounds": rounds}


# --------------------------------------------------------------------------- training step


def _set_checkpointing(model, on: bool) -> None:
    """Gradient checkpointing on or off, by the name this transformers release uses (later 5.x
    releases call it activation checkpointing and warn on the old name)."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def bench_train_step(repeats: int, base: torch.nn.Module | None = None, model_name: str = "",
                     response: int = 256) -> dict[str, Any]:
    """DAIL step / NLL step, without and with gradient checkpointing (the trainer's default on a
    GPU, and the paper's setting); the floor is what the ratio would be if the contrastive loss
    cost no more than the NLL: (NLL step + the two teachers' forwards with their logits) / NLL.
    `base` defaults to a random Qwen2 (hidden 256, 4 layers, vocabulary 8192)."""
    from peft import LoraConfig, get_peft_model

    from dail.training.trainer import DAILCollator, DAILConfig, DAILTrainer, response_logits

    if base is None:
        base, model_name = random_qwen2(256, 4, 8192), "random Qwen2 hidden 256, 4 layers, vocab 8192"
    vocab = base.config.vocab_size
    model = get_peft_model(base, LoraConfig(r=32, lora_alpha=32, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    g = torch.Generator().manual_seed(0)
    examples = [{"prompt_ids": {"student": torch.randint(3, vocab, (32,), generator=g).tolist(),
                                "privileged": torch.randint(3, vocab, (160,), generator=g).tolist(),
                                "negative": torch.randint(3, vocab, (48,), generator=g).tolist()},
                 "response_ids": torch.randint(3, vocab, (response,), generator=g).tolist()} for _ in range(2)]
    batch = DAILCollator(pad_id=0, roles=("student", "privileged", "negative"))(examples)
    results: dict[str, Any] = {}
    for checkpointing in (False, True):
        if checkpointing:  # as the Trainer sets it up; it only acts in training mode
            _set_checkpointing(model, True)
        model.train(checkpointing)
        times: dict[str, list[float]] = {"dail": [], "nll": [], "teachers": [], "cached": []}
        trainers = {name: DAILTrainer(model=model, args=DAILConfig(
                        output_dir="/tmp/dail-bench", loss=loss, use_cpu=True, teacher_cache_gb=cache_gb))
                    for name, loss, cache_gb in (("dail", "dail", 0.0), ("nll", "nll", 0.0),
                                                 ("cached", "dail", 1.0))}
        for _ in range(repeats + 1):  # the first round warms up (and fills the teacher cache)
            for name, trainer in trainers.items():
                model.zero_grad()
                tic = time.perf_counter()
                trainer.compute_loss(model, batch).backward()
                times[name].append(time.perf_counter() - tic)
            tic = time.perf_counter()  # the two teachers' forwards alone: what no loss can avoid
            with torch.no_grad(), model.disable_adapter():
                for role in ("privileged", "negative"):
                    response_logits(model, batch, role)
            times["teachers"].append(time.perf_counter() - tic)
        # Ratios within a round, then their median: a slow stretch of the machine hits both.
        rounds = list(zip(*(times[k][1:] for k in ("dail", "nll", "teachers", "cached")), strict=True))
        dail, nll, teachers = (statistics.median(times[k][1:]) for k in ("dail", "nll", "teachers"))
        key = "checkpointing" if checkpointing else "plain"
        results[key] = {"ratio": round(statistics.median(d / n for d, n, _, _ in rounds), 3),
                        "floor": round(statistics.median((n + t) / n for _, n, t, _ in rounds), 3),
                        "cached_ratio": round(statistics.median(c / n for _, n, _, c in rounds), 3),
                        "dail_s": round(dail, 3), "nll_s": round(nll, 3), "teacher_forwards_s": round(teachers, 3)}
    _set_checkpointing(model, False)
    model.unload()  # the base model as it was given
    return {**results["plain"], "with_checkpointing": results["checkpointing"], "model": f"{model_name}, LoRA r=32",
            "batch": f"2 x {response} response tokens; prompts: student 32, privileged 160, negative 48 tokens"}


# --------------------------------------------------------------------------- loss memory


def _status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status ("VmRSS", "VmHWM")."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


# glibc raises its mmap threshold each time a mapped block is freed, so later blocks of that
# size come from the heap, where freed memory stays in RSS: peaks then depend on the order of
# earlier frees and vary from run to run (0.63-1.09 for teacher_memory). With a fixed threshold
# every tensor above 64 KiB is its own mapping, returned on free, and the peak RSS follows the
# peak of live tensor bytes (0.61-0.65 for teacher_memory over three full runs).
STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_ARENA_MAX": "1"}


def _run_child(flag: str, mode: str, *numbers: int) -> dict[str, Any]:
    """Run `python -m bench <flag> <mode> <numbers>` in a fresh process; its last line as JSON."""
    out = subprocess.run([sys.executable, "-m", "bench", flag, mode, *map(str, numbers)],
                         capture_output=True, text=True, check=True, cwd=HERE.parent,
                         env={**os.environ, **STEADY_MALLOC})
    return json.loads(out.stdout.strip().splitlines()[-1])


def loss_memory_child(mode: str, tokens: int, vocab: int, hidden: int, chunk: int) -> None:
    """Run in a subprocess: one contrastive loss + backward; prints JSON with peak RSS growth."""
    from dail.training.loss import chunked_contrastive_kl_terms, contrastive_kl_terms

    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=False).requires_grad_(False)
    hs = torch.randn(tokens, hidden, requires_grad=True)
    hp, hn = torch.randn(tokens, hidden), torch.randn(tokens, hidden)
    before = _status_bytes("VmRSS")
    if mode == "plain":
        with torch.no_grad():
            lp, ln = head(hp), head(hn)
        pos, neg = contrastive_kl_terms(head(hs), lp, ln, torch.ones(tokens))
        loss = pos - 0.1 * neg
        del lp, ln
    else:
        loss = chunked_contrastive_kl_terms(hs, hp, hn, head, gamma=0.1, chunk_size=chunk)[0]
    loss.backward()
    # VmHWM belongs to this address space; getrusage's ru_maxrss would carry over the parent's
    # peak through fork and exec and put a floor under small measurements.
    peak = _status_bytes("VmHWM")
    print(json.dumps({"peak_growth": peak - before, "loss": float(loss.detach()),
                      "grad_norm": float(hs.grad.norm()), "grad_sum": float(hs.grad.sum())}))


def bench_loss_memory(tokens: int, vocab: int = 151936, hidden: int = 896, chunk: int | None = None) -> dict[str, Any]:
    from dail.training.trainer import DAILConfig

    chunk = chunk or DAILConfig.loss_chunk_size  # what the trainer uses by default
    c, p = (_run_child("--loss-memory-child", mode, tokens, vocab, hidden, chunk) for mode in ("chunked", "plain"))
    return {"ratio": round(c["peak_growth"] / p["peak_growth"], 4),
            "chunked_mib": round(c["peak_growth"] / 2**20, 1), "plain_mib": round(p["peak_growth"] / 2**20, 1),
            "loss_abs_diff": abs(c["loss"] - p["loss"]),
            "grad_norm_rel_diff": abs(c["grad_norm"] - p["grad_norm"]) / p["grad_norm"],
            "tokens": tokens, "vocab": vocab, "hidden": hidden, "chunk": chunk,
            "method": "peak RSS (VmHWM) minus RSS before the loss, fresh subprocess each, fixed mmap threshold"}


def teacher_memory_child(mode: str, tokens: int, hidden: int, layers: int, vocab: int) -> None:
    """Run in a subprocess: one no-grad teacher forward over `tokens`; prints peak RSS growth."""
    from dail.training.trainer import response_hidden

    model = random_qwen2(hidden, layers, vocab)
    response = tokens // 2
    ids = torch.randint(1, vocab, (1, tokens))
    batch = {"privileged_input_ids": ids, "privileged_attention_mask": torch.ones_like(ids),
             "response_mask": torch.ones(1, response, dtype=torch.long)}
    before = _status_bytes("VmRSS")
    with torch.no_grad():
        if mode == "hook":
            hidden = response_hidden(model, batch, "privileged")
        else:
            out = model(input_ids=ids, use_cache=False, output_hidden_states=True, logits_to_keep=1)
            hidden = out.hidden_states[-1][:, -(response + 1):-1]
    peak = _status_bytes("VmHWM")
    print(json.dumps({"peak_growth": peak - before, "sum": float(hidden.double().sum())}))


def bench_teacher_memory(tokens: int, hidden: int = 512, layers: int = 12, vocab: int = 8192) -> dict[str, Any]:
    h, a = (_run_child("--teacher-memory-child", mode, tokens, hidden, layers, vocab) for mode in ("hook", "all_layers"))
    return {"ratio": round(h["peak_growth"] / a["peak_growth"], 4),
            "hook_mib": round(h["peak_growth"] / 2**20, 1), "all_layers_mib": round(a["peak_growth"] / 2**20, 1),
            "same_hidden_states": abs(h["sum"] - a["sum"]) <= 1e-6 * max(1.0, abs(a["sum"])),
            "tokens": tokens, "model": f"random Qwen2 hidden {hidden}, {layers} layers, vocab {vocab}",
            "method": "peak RSS (VmHWM) minus RSS before the forward, fresh subprocess each, fixed mmap threshold"}


# --------------------------------------------------------------------------- real model


def bench_real_model(quick: bool, repeats: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """SmolLM2-135M-Instruct on CHAMP prompts: rollout rows at tau 0.8 (and 0 in the full run),
    prompt sharing, the train step and the loss's memory at its vocabulary."""
    from bench.real_model import bench_shared_prompts, champ_prompts, smollm2

    model, tokenizer = smollm2()
    name = f"SmolLM2-135M-Instruct {params(model)}"
    make = partial(champ_prompts, tokenizer)
    # A quick run keeps batch 1 and three rounds (a forward of this model over the CHAMP prompts
    # costs seconds on two cores, and every round times three engines) and 64-token responses
    # in the train step.
    budget = 32 if quick else 128
    rows = bench_rollout(model, name, [1] if quick else [1, 8, 32], budget, [0.8], 1 if quick else repeats, make)
    if not quick:  # the student at every position: what the joint forward costs on real text
        rows += bench_rollout(model, name, [1, 8], budget, [0.0], repeats, make)
    shared = bench_shared_prompts(model, tokenizer, 16 if quick else budget, 2 if quick else 5)
    train = bench_train_step(1 if quick else 5, model, "SmolLM2-135M-Instruct", response=64 if quick else 256)
    memory = bench_loss_memory(512 if quick else 2048, vocab=model.config.vocab_size, hidden=model.config.hidden_size)
    main = [r for r in rows if r["tau"] == 0.8]
    section = {
        "model": name, "prompts": "CHAMP problems, paper's format, the model's chat template", "budget": budget,
        "rollout_vs_sampling": {str(r["batch"]): r["vs_sampling"] for r in main},
        "rollout_vs_reference": {str(r["batch"]): r["vs_reference"] for r in main},
        "spread": {str(r["batch"]): r["spread"] for r in main},
        "acceptance": {str(r["batch"]): r["acceptance"] for r in main},
        "draft_length": {str(r["batch"]): r["draft_length"] for r in main},
        "guessed_share": {str(r["batch"]): r["guessed_share"] for r in main},
        "prefill_share": {str(r["batch"]): r["prefill_share"] for r in main},
        "shared_prompts_speedup": shared["speedup"], "shared_prompts": shared,
        "train_step": {"ratio": train["ratio"], "with_checkpointing": train["with_checkpointing"]["ratio"]},
        "train_step_detail": train, "loss_memory": memory,
    }
    return rows, section


# --------------------------------------------------------------------------- main


def update_real_model(quick: bool, repeats: int | None = None) -> None:
    """Run the SmolLM2 rows alone (the world rows cost a third of `make bench`) and put them in
    bench/results.json in place of the last run's, with this run's own command and minutes."""
    started = time.perf_counter()
    rows, real = bench_real_model(quick, repeats or (2 if quick else 3))
    train = real.pop("train_step_detail")
    real["command"] = ("python -m bench --only real_model" + (" --quick" if quick else "")
                       + (f" --repeats {repeats}" if repeats else ""))
    real["minutes"] = round((time.perf_counter() - started) / 60, 1)
    real["rows"] = rows
    path = HERE / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results["real_model"], results["train_step"] = real, train
    results["rollout_details"] = [r for r in results.get("rollout_details", []) if r["model"] != rows[0]["model"]] + rows
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in real.items() if k not in ("rows", "shared_prompts")}, indent=2))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--quick", action="store_true", help="fewer settings; finishes in a few minutes")
    parser.add_argument("--only", choices=["train_step", "real_model"],
                        help="train_step: print its JSON alone (bench/results.json is left as it is); "
                             "real_model: run the SmolLM2 rows alone and replace their section of bench/results.json")
    parser.add_argument("--repeats", type=int, help="with --only real_model: rounds at batch 32 (2 x N + 1 at "
                                                   "batches up to 8; default 3)")
    parser.add_argument("--loss-memory-child", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--teacher-memory-child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for child, run_child in ((args.loss_memory_child, loss_memory_child),
                             (args.teacher_memory_child, teacher_memory_child)):
        if child:
            mode, *numbers = child
            run_child(mode, *map(int, numbers))
            return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_grad_enabled(True)
    quick = args.quick
    if args.only == "train_step":
        from bench.real_model import smollm2

        print(json.dumps(bench_train_step(2 if quick else 5, smollm2()[0], "SmolLM2-135M-Instruct"), indent=2))
        return
    if args.only == "real_model":
        update_real_model(quick, args.repeats)
        return
    started = time.perf_counter()
    demo, demo_name = demo_model()
    budget = 32 if quick else 64
    repeats = 2 if quick else 3  # rounds at batch 64; smaller batches get 2 * repeats + 1
    # The world model gets the demo's own prompts (its acceptance there is what drafting sees);
    # a random model accepts nothing whatever its prompts.
    rows = bench_rollout(demo, f"{demo_name} {params(demo)}", [1, 8] if quick else [1, 8, 64], budget,
                         [0.8, 0.0], repeats, world_prompts if demo_name == "world base model" else None,
                         min_seconds=3 if quick else 10)
    modes = bench_inference_mode(demo, [1, 8], budget, 5 if quick else 15,
                                 world_prompts if demo_name == "world base model" else None)
    # Lookup at the length of the demo's traces (about 210 tokens), where they repeat themselves.
    lookup = bench_lookup(demo, [1, 4], 256, 3 if quick else 9,
                          world_prompts if demo_name == "world base model" else None)
    del demo
    logger.info("world model rows: %.0f s", time.perf_counter() - started)
    real_rows, real = bench_real_model(quick, repeats)
    logger.info("real model rows: %.0f s in all so far", time.perf_counter() - started)
    rows += real_rows
    train = real.pop("train_step_detail")
    memory = bench_loss_memory(512 if quick else 2048)
    teacher = bench_teacher_memory(1024 if quick else 2048)
    main_rows = [r for r in rows if r["tau"] == 0.8 and r["model"] == rows[0]["model"]]
    results = {
        "quick": quick,
        "command": "make bench" + (" QUICK=1" if quick else ""),
        "rollout_vs_sampling": {str(r["batch"]): r["vs_sampling"] for r in main_rows},
        "rollout_vs_reference": {str(r["batch"]): r["vs_reference"] for r in main_rows},
        "rollout_acceptance": {str(r["batch"]): r["acceptance"] for r in main_rows},
        "rollout_draft_length": {str(r["batch"]): r["draft_length"] for r in main_rows},
        "rollout_double_rows_cost": {str(r["batch"]): r["double_rows_cost"] for r in main_rows},
        "rollout_details": rows,
        "real_model": real,
        "inference_mode": modes,
        "lookup": lookup,
        "train_step": train,
        "loss_memory": memory,
        "teacher_memory": teacher,
        "minutes": round((time.perf_counter() - started) / 60, 1),
    }
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{'model':<44} {'B':>3} {'tau':>4} {'vs_sampling':>11} {'vs_reference':>12} "
          f"{'draft_vs_ref':>12} {'accept':>6} {'draft_k':>7} {'unasked':>7} {'guessed':>7} {'2B/B':>5} {'prefill':>7} "
          f"{'same':>5} {'spread':>6}")
    for r in rows:
        print(f"{r['model'][:44]:<44} {r['batch']:>3} {r['tau']:>4} {r['vs_sampling']:>11} {r['vs_reference']:>12} "
              f"{r['draft_vs_reference']:>12} {r['acceptance']:>6} {r['draft_length']:>7} {r['unasked_share']:>7} "
              f"{r['guessed_share']:>7} {r['double_rows_cost']:>5} {r['prefill_share']:>7} "
              f"{r['identical_traces']:>5} {r['spread']:>6}")
    print(f"lookup (engine time without lookup rounds / with them, {demo_name}, budget {lookup['budget']}): "
          + ", ".join(f"batch {b} {r} (guessed {lookup['guessed_share'][b]})" for b, r in lookup["speedup"].items())
          + f"; same traces: {lookup['same_traces']}")
    print(f"inference_mode (engine time under no_grad / under inference_mode, {demo_name}): "
          + ", ".join(f"batch {b} {r}" for b, r in modes["speedup"].items()) + f"; same traces: {modes['same_traces']}")
    shared = real["shared_prompts"]
    print(f"shared_prompts ({shared['samples']} samples of one CHAMP problem, engine time without sharing / with it, "
          f"budget {shared['budget']}): {shared['speedup']} (spread {shared['spread']}; prefill share "
          f"{shared['prefill_share']['unshared']} -> {shared['prefill_share']['shared']}; "
          f"same traces: {shared['same_traces']})")
    ckpt = train["with_checkpointing"]
    print(f"train_step on {train['model']} (DAIL / NLL step time): {train['ratio']}  ({train['dail_s']} s / {train['nll_s']} s), "
          f"floor {train['floor']}, teacher cache filled {train['cached_ratio']}; with gradient checkpointing: "
          f"{ckpt['ratio']}, floor {ckpt['floor']}, cached {ckpt['cached_ratio']}  "
          "(floor: (NLL step + the teachers' forwards) / NLL step)")
    for m in (memory, real["loss_memory"]):
        print(f"loss_memory at vocabulary {m['vocab']} (chunked / plain peak): {m['ratio']}  ({m['chunked_mib']} MiB / "
              f"{m['plain_mib']} MiB at {m['tokens']} tokens; |dloss| {m['loss_abs_diff']:.2e})")
    print(f"teacher_memory (hook / all layers' outputs, peak): {teacher['ratio']}  ({teacher['hook_mib']} MiB / "
          f"{teacher['all_layers_mib']} MiB at {teacher['tokens']} tokens; same states: {teacher['same_hidden_states']})")
    if quick:
        print("quick mode: budget 32 tokens, batches 1 and 8 (SmolLM2: batch 1, tau 0.8), loss memory at 512 tokens")
    print(f"{results['minutes']} minutes")


if __name__ == "__main__":
    main()
