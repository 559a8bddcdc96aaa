"""Pretrain the world's tiny base model from scratch on KNOWN problem types only.

The mixture (per sequence) teaches, always with the detailed trace as the response:
  * drills: single primitive operations, heavy at the start (a curriculum);
  * student prompts on known types: solve from the problem alone;
  * privileged prompts holding a didactic reference, on known types and, above all, on the
    generic task (random statements, random labels, random expression shapes): expand every
    fused reference line into primitive steps -- the skill that transfers to novel types;
  * a few negative-reference prompts, so the format is not foreign.
With `copy_rate` > 0 the roles that see the expert's solution sometimes copy its fused lines
instead of expanding them (a privileged-only style, as a model shown a solution drifts into);
with `habit_rate` > 0 they write some primitive lines their own way (operands swapped, the
reference's compact notation): many small choices per trace, each one the student never makes.
Loss is next-token cross-entropy on response tokens (and the closing EOS) only. Data are drawn
from a generator seeded by (seed, step); the mixture and the learning rate also follow the share
of the budget used. Under a step budget alone (`minutes` 0) that share depends on nothing but the
step, so the run is the same on any machine and across any resume.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from dail.data import save_dir_atomic
from dail.rollout.prompts import PromptBuilder
from dail.world import generator as gen

logger = logging.getLogger(__name__)


def _opt(default: Any, help: str, **allowed: Any) -> Any:
    """A field with its command-line help (`dail world pretrain --help`) and, for a number, its
    range (`dail.config.Number`'s low, high, low_open, high_open)."""
    return field(default=default, metadata={"help": help, "range": allowed})


@dataclass
class PretrainConfig:
    """Settings of one pretraining run (recorded in pretrain_settings.json)."""

    out: str = _opt("src/dail/world/assets/base", "where the final model and tokenizer are saved")
    work: str = _opt("/tmp/dail_world_pretrain", "checkpoints and logs; rerunning with the same folder resumes")
    seed: int = _opt(0, "seed of the initial weights and of the data stream", low=0)
    minutes: float = _opt(240.0, "wall-clock budget; the LR schedule and curriculum follow max(steps, time) used "
                                 "(0 = none: a step budget alone gives the same model on any machine)", low=0)
    max_steps: int = _opt(100_000, "step budget (whichever of the two budgets runs out first ends the run)", low=1)
    batch_size: int = _opt(16, "sequences per step", low=1)
    lr: float = _opt(2.5e-3, "peak learning rate (linear warm-up, then cosine decay to a tenth of it)", low=0,
                      low_open=True)
    warmup: int = _opt(100, "warm-up steps", low=0)
    weight_decay: float = _opt(0.01, "AdamW weight decay", low=0)
    hidden: int = _opt(192, "hidden size of the Qwen2 model", low=1)
    layers: int = _opt(4, "transformer layers", low=1)
    heads: int = _opt(6, "attention heads", low=1)
    kv_heads: int = _opt(3, "key/value heads", low=1)
    intermediate: int = _opt(512, "MLP width", low=1)
    eval_every: int = _opt(400, "steps between greedy checks on held-out problems", low=1)
    ckpt_every: int = _opt(100, "steps between checkpoints, each also saved as a loadable model in <work>/latest",
                          low=1)
    threads: int = _opt(2, "CPU threads for torch", low=1)
    init: str = _opt("", "start from the weights of a saved model directory (fresh optimizer)")
    # A privileged-only style, as a model shown a solution drifts into: direct sampling from it
    # inherits it, while a mixed rollout with tau <= 1 - copy_rate accepts the student's own
    # continuation there.
    copy_rate: float = _opt(0.0, "chance that a role seeing the expert's solution copies an item's fused line, "
                                 "value included, instead of working it out (0 = never, the committed model)",
                                 low=0, high=1)
    # Many small privileged-only choices per trace, each inside tau's margin: a mixed rollout at
    # tau <= 1 - habit_rate accepts the student's own line there, while direct sampling keeps the
    # habit a few percent of the time even at temperature 0.6 and top-p 0.95, on every line.
    habit_rate: float = _opt(0.0, "chance, per primitive line and per habit, that a role seeing the expert's "
                                  "solution swaps a sum's or product's operands, and (independently) writes it "
                                  "in the reference's compact notation (0 = never, the committed model)",
                                  low=0, high=1)
    # A label is then a unique anchor in the reference, and copying what follows it is the first
    # form of copying a tiny model learns; copying whole expressions precisely builds on it.
    many_labels: float = _opt(0.5, "fraction of the budget, from the start, in which the generic task draws "
                                   "its item labels from all label tokens instead of r1..r4 (0 = never)", low=0, high=1)
    # Copying fails where the token before does not tell which token comes next: rows of a
    # matrix product share their first factor, polynomial lines repeat x.
    ambiguous_rate: float = _opt(0.3, "chance that a generic reference's expressions repeat two or three "
                                      "digits and share openings between items (0 = never)", low=0, high=1)

    def __post_init__(self) -> None:
        from dail.config import range_problem

        for f in fields(self):
            if f.metadata.get("range") and (problem := range_problem(getattr(self, f.name), **f.metadata["range"])):
                raise ValueError(f"--{f.name.replace('_', '-')} {getattr(self, f.name)}: {problem}")


# (task, role) weights after the warm-up phase; drills dominate the first `_WARM` of steps.
_MIX = {
    ("drill", "student"): 6, ("vecsum", "student"): 5, ("dot", "student"): 7,
    ("axpy", "student"): 6, ("expr", "student"): 10,
    ("vecsum", "privileged"): 2, ("dot", "privileged"): 3, ("axpy", "privileged"): 3,
    ("expr", "privileged"): 3, ("generic", "privileged"): 38,
    # Single-operation items: copying each expression from the reference is most of the
    # response, the skill reference-following rests on.
    ("drill", "privileged"): 12,
    ("generic", "negative"): 2, ("dot", "negative"): 1, ("expr", "negative"): 2,
}
_WARM = 0.06


def make_drill(rng: random.Random) -> gen.Spec:
    """Two to four single primitive operations."""
    labels = gen.LABELS[:rng.randint(2, 4)]
    items = []
    for label in labels:
        a, b = rng.randrange(10), rng.randrange(10)
        op = rng.choice("+*-")
        expr = (("+", (a, b)),) if op == "*" else (("+", (a,)), (op, (b,)))
        items.append((label, expr))
    statement = ("Evaluate modulo 10: "
                 + gen._and_list([f"{lab} = {gen.fused(e)}" for lab, e in items]) + ".")
    return gen.Spec("drill", statement, "Evaluate each expression.", tuple(items))


def sample_example(rng: random.Random, progress: float, tokenizer: Any, builder: PromptBuilder,
                   copy_rate: float = 0.0, many_labels: bool = False,
                   ambiguous_rate: float = 0.0, habit_rate: float = 0.0) -> tuple[list[int], list[int]]:
    """One (prompt ids, response ids) pair; the response ends with EOS."""
    tasks = list(_MIX)
    weights = [w * (8.0 if (progress < _WARM and kind == "drill") else 1.0) for (kind, _), w in _MIX.items()]
    kind, role = rng.choices(tasks, weights)[0]
    if kind == "drill":
        spec = make_drill(rng)
    elif kind == "generic" and (many_labels or ambiguous_rate > 0):  # no draws when off: the default stream
        labels = tuple(rng.sample(gen.ALL_LABELS, 4)) if many_labels else gen.LABELS
        ambiguous = ambiguous_rate > 0 and rng.random() < ambiguous_rate
        spec = gen.make_generic(rng, labels=labels, ambiguous=ambiguous)
    else:
        spec = gen.spec_of(kind, rng)
    prompt = builder.render(spec.to_problem("pretrain"), tokenizer)[role]
    copied: set[int] = set()
    if copy_rate > 0 and role != "student" and kind != "drill":  # no draws at 0: the same stream
        copied = {i for i in range(len(spec.items)) if rng.random() < copy_rate}
    rewrite = None
    if habit_rate > 0 and role != "student":  # no draws at 0: the same stream
        def rewrite(line: str) -> str:
            return gen.privileged_habits(line, swap=rng.random() < habit_rate, compact=rng.random() < habit_rate)
    p_ids = tokenizer.encode(prompt, add_special_tokens=False)
    r_ids = tokenizer.encode(spec.detailed(copied, rewrite), add_special_tokens=False) + [tokenizer.eos_token_id]
    return p_ids, r_ids


_BUCKETS = 4


def make_batch(step: int, cfg: PretrainConfig, tokenizer: Any, builder: PromptBuilder,
               progress: float) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels are -100 on prompt and padding positions.

    Examples are drawn in groups of `_BUCKETS` batches (seeded by the group) and sorted by
    length, so each batch holds sequences of similar length and wastes little on padding.
    """
    group, part = divmod(step, _BUCKETS)
    rng = random.Random(cfg.seed * 1_000_003 + group)
    pool = [sample_example(rng, progress, tokenizer, builder, cfg.copy_rate, progress < cfg.many_labels,
                           cfg.ambiguous_rate, cfg.habit_rate) for _ in range(cfg.batch_size * _BUCKETS)]
    pool.sort(key=lambda pr: len(pr[0]) + len(pr[1]))
    pairs = pool[part * cfg.batch_size:(part + 1) * cfg.batch_size]
    length = max(len(p) + len(r) for p, r in pairs)
    ids = torch.full((len(pairs), length), tokenizer.pad_token_id)
    labels = torch.full((len(pairs), length), -100)
    mask = torch.zeros((len(pairs), length), dtype=torch.long)
    for i, (p, r) in enumerate(pairs):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r)
        labels[i, len(p):n] = torch.tensor(r)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def build_model(cfg: PretrainConfig, vocab_size: int, tokenizer: Any) -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
        intermediate_size=cfg.intermediate, max_position_embeddings=1024,
        tie_word_embeddings=True, rope_theta=10000.0,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.pad_token_id)
    torch.manual_seed(cfg.seed)
    return Qwen2ForCausalLM(config)


def lr_at(step: int, progress: float, cfg: PretrainConfig) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 10% of the peak.

    `progress` is the fraction of the budget used: of the steps, or of the wall time when
    that has run further.
    """
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = min(1.0, progress)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def run(cfg: PretrainConfig, command: str = "") -> Path:
    """Train (resuming from `cfg.work` if a checkpoint is there) and save to `cfg.out`.

    `command` is recorded in pretrain_settings.json as the command line that made the model.
    """
    from dail.world.tokenizer import build_tokenizer, load_tokenizer

    torch.set_num_threads(cfg.threads)
    work = Path(cfg.work)
    work.mkdir(parents=True, exist_ok=True)
    tok_dir = Path(cfg.init) if cfg.init else work / "tokenizer"
    if tok_dir.exists():
        tokenizer = load_tokenizer(tok_dir)
    else:
        tokenizer = build_tokenizer()
        tokenizer.save_pretrained(tok_dir)
    builder = PromptBuilder()
    model = build_model(cfg, len(tokenizer), tokenizer)
    if cfg.init:
        from transformers import AutoModelForCausalLM

        init = AutoModelForCausalLM.from_pretrained(cfg.init, dtype=torch.float32)
        model.load_state_dict(init.state_dict())
        logger.info("initialised from %s", cfg.init)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("model: %.2fM parameters", n_params / 1e6)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8)
    step, tokens, elapsed, segments = 0, 0, 0.0, []
    ckpt = work / "ckpt.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, tokens, elapsed = state["step"], state["tokens"], state["elapsed"]
        segments = state.get("segments", [])
        logger.info("resumed at step %d (%d tokens, %.1f min)", step, tokens, elapsed / 60)
    # A resumed run may change its budget or mixture; each change is recorded where it began.
    settings_now = {"minutes": cfg.minutes, "max_steps": cfg.max_steps, "lr": cfg.lr,
                    "copy_rate": cfg.copy_rate, "many_labels": cfg.many_labels}
    if cfg.ambiguous_rate:  # recorded only when used: runs without it keep their segments
        settings_now["ambiguous_rate"] = cfg.ambiguous_rate
    if cfg.habit_rate:
        settings_now["habit_rate"] = cfg.habit_rate
    if not segments or {k: v for k, v in segments[-1].items() if k != "from_step"} != settings_now:
        segments.append({"from_step": step, **settings_now})
    model.train()
    start = time.time() - elapsed
    ema = None
    def progress() -> float:
        # A wall-clock budget moves the schedule and the curriculum with the machine's speed.
        used = step / cfg.max_steps
        return max(used, (time.time() - start) / (cfg.minutes * 60)) if cfg.minutes > 0 else used

    with logging_redirect_tqdm(), _budget_bar(progress()) as bar:
        while progress() < 1.0:
            frac = progress()
            batch = make_batch(step, cfg, tokenizer, builder, frac)
            lr = lr_at(step, frac, cfg)
            loss = _optimizer_step(model, opt, batch, lr)
            step += 1
            tokens += int(batch["attention_mask"].sum())
            ema = loss if ema is None else 0.95 * ema + 0.05 * loss
            if step % 20 == 0:
                done = min(100.0, round(100 * progress(), 1))
                logger.info("step %d loss %.4f (ema %.4f) lr %.2e tokens %d min %.1f (%.0f%% of the budget)",
                            step, loss, ema, lr, tokens, (time.time() - start) / 60, done)
                bar.set_postfix_str(f"step {step}, loss {ema:.3f}", refresh=False)
                bar.update(done - bar.n)
            if step % cfg.ckpt_every == 0:
                _checkpoint(ckpt, model, opt, step, tokens, time.time() - start, segments)
                _snapshot(work / "latest", model, tokenizer, step, tokens)
            if step % cfg.eval_every == 0:
                model.eval()
                logger.info("eval at step %d: %s", step, json.dumps(quick_eval(model, tokenizer)))
                model.train()
        bar.update(100 - bar.n)
    wall = time.time() - start
    _checkpoint(ckpt, model, opt, step, tokens, wall, segments)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    settings = {"config": asdict(cfg), "steps": step, "tokens": tokens,
                "wall_minutes": round(wall / 60, 1), "parameters": n_params,
                "segments": segments,
                "command": command,
                "torch": torch.__version__}
    history = Path(cfg.init) / "pretrain_settings.json" if cfg.init else None
    if history is not None and history.exists():
        settings["init_from"] = json.loads(history.read_text())  # the chain of runs behind `init`
    (out / "pretrain_settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    logger.info("saved %s after %d steps, %d tokens, %.1f min", out, step, tokens, wall / 60)
    return out


def _optimizer_step(model: Any, opt: Any, batch: dict[str, torch.Tensor], lr: float) -> float:
    """One AdamW step at learning rate `lr` with the gradient norm clipped to 1; returns the loss."""
    for group in opt.param_groups:
        group["lr"] = lr
    loss = model(**batch).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()


def _budget_bar(done: float) -> tqdm:
    """A bar over the share of the budget used, in percent; off unless stderr is a terminal
    (a run in the background logs a line every 20 steps instead)."""
    return tqdm(total=100, initial=round(100 * done, 1), desc="pretraining", disable=None,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}, {postfix}")


def _snapshot(path: Path, model: Any, tokenizer: Any, step: int, tokens: int) -> None:
    """The weights at a checkpoint as a loadable model (`dail world validity/diagnose --model
    <work>/latest` while the run goes on); replaced whole, never left half-written."""
    from transformers.utils import logging as hf_logging

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "snapshot.json").write_text(json.dumps({"step": step, "tokens": tokens}) + "\n")

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar per checkpoint would crowd the training log
    try:
        save_dir_atomic(path, save)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _checkpoint(path: Path, model: Any, opt: Any, step: int, tokens: int, elapsed: float,
                segments: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                "tokens": tokens, "elapsed": elapsed, "segments": segments}, tmp)
    os.replace(tmp, path)


@torch.no_grad()
def quick_eval(model: Any, tokenizer: Any, n: int = 12) -> dict[str, float]:
    """Greedy accuracy on a few test problems: known types (student), novel (privileged)."""
    from dail.world.validity import greedy_accuracy

    out = {}
    for kind, role in (("dot", "student"), ("expr", "student"), ("axpy", "student"),
                       ("matmul", "privileged"), ("poly", "privileged"),
                       ("matmul", "student")):
        problems = gen.generate(kind, n, split="test", seed=99)
        out[f"{kind}/{role}"] = greedy_accuracy(model, tokenizer, problems, role)
    return out
