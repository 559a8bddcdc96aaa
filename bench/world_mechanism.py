"""What the contrastive loss does to the world model during training, checkpoint by checkpoint.

    python -m bench.world_mechanism --out runs/mechanism --divergence reverse forward

trains the demo's contrastive adapter on the demo's mixed-rollout traces once per setting
(divergence x learning rate x epochs x rank), saving a checkpoint every `--every` steps, and at
step 0 and every checkpoint measures, on a fixed probe of training traces (teacher-forced):

- by kind of position (the token the student proposed and kept, `S`, or the privileged model's
  fallback, `P`; expression tokens, the method, or the rest): the student's probability of the
  trace token, the privileged teacher's, the teacher's tail (1 - its top probability), the
  student's mass on tokens the teacher gives less than 1e-3, both KL directions, and how hard
  the positive term pushes the trace token's logit up (minus the gradient of the per-position
  divergence with respect to that logit); and at the positions where the student gives the
  trace token less than 0.01 ("locked"), its top token's probability, the teacher's probability
  of that token, and the push of the reverse and of the forward KL;
- the gradient norm of each loss term (positive, gamma x negative) over the LoRA weights, and
  of the next-token loss as a yardstick;
- sampled pass@1 and pass@8 (temperature 0.6, top-p 0.95) on held-out novel problems, and
  pass@1 on known types.

The Trainer's own log (loss terms every 10 steps, its grad norm) comes with it. Writes
`<out>/<run>/mechanism.json` per run and `<out>/mechanism.md` with every table.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger("bench.world_mechanism")

GROUPS = ("S expression", "S other", "P expression", "P other")
TAIL = 1e-3  # a teacher probability below this is its tail


@dataclass(frozen=True)
class Setting:
    divergence: str
    learning_rate: float
    epochs: float
    lora_r: int
    gamma: float
    targets: tuple[str, ...] = ("all-linear",)
    seed: int = 0

    @property
    def name(self) -> str:
        where = "" if self.targets == ("all-linear",) else "-" + "+".join(self.targets)
        return (f"{self.divergence.replace(':', '')}-lr{self.learning_rate:g}-ep{self.epochs:g}-r{self.lora_r}"
                f"{where}-g{self.gamma:g}-s{self.seed}")

    @property
    def target_modules(self) -> str | list[str]:
        return "all-linear" if self.targets == ("all-linear",) else list(self.targets)


def demo_traces(demo_root: Path) -> str:
    """The demo's selected mixed-rollout traces (generated, or found in the demo's cache)."""
    from dail import world
    from dail.stages import demo
    from dail.stages.demo import comparison

    settings = demo.DemoSettings()
    data = comparison.write_problems(demo_root / "data", settings)
    return comparison.make_traces(demo_root, world.base_model_dir(), data["train"], "mixed", settings)[0]


def train(setting: Setting, traces: str, out: Path, every: int) -> Path:
    """The demo's contrastive training with this setting, checkpointing every `every` steps."""
    from dail import world
    from dail.config import ModelConfig, TrainConfig
    from dail.stages import train as training_stage

    training = {"num_train_epochs": setting.epochs, "learning_rate": setting.learning_rate,
                "lora_r": setting.lora_r, "lora_alpha": setting.lora_r, "per_device_train_batch_size": 1,
                "gradient_accumulation_steps": 4, "seed": setting.seed, "save_steps": every,
                "save_total_limit": None, "max_length": 2048, "logging_steps": 10,
                "dataloader_pin_memory": False, "divergence": setting.divergence, "teacher_cache_gb": 1.0,
                "lora_target_modules": setting.target_modules}
    cfg = TrainConfig(traces=traces, loss="dail", gamma=setting.gamma, out=str(out),
                      model=ModelConfig(model=str(world.base_model_dir()), device="cpu"), training=training)
    if not (out / "train_summary.json").exists():
        training_stage.run(cfg)
    return out


def probe_examples(traces: str, tokenizer: Any, n: int) -> list[dict[str, Any]]:
    """`n` training traces, the types in turn, each with its tokens' source and kind."""
    from dail.data import read_jsonl
    from dail.world.validity import token_category

    rows = read_jsonl(traces)
    by_type: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_type.setdefault(row["id"].split("-")[0], []).append(row)
    picked = [group[i] for i in range(n) for group in by_type.values() if i < len(group)][:n]
    examples = []
    for row in picked:
        kinds, line = [], ""
        for token_id in row["token_ids"]:
            token = tokenizer.decode([token_id])
            kinds.append("expression" if token_category(line, token) == "expression" else "other")
            line = (line + token).rsplit("\n", 1)[-1]
        examples.append({"prompt_ids": row["prompt_ids"], "response": row["token_ids"],
                         "groups": [f"{source} {kind}" for source, kind in zip(row["sources"], kinds, strict=True)]})
    return examples


def response_logits(model: Any, prompt: list[int], response: list[int]) -> torch.Tensor:
    """(T, V) logits predicting each response token after `prompt`."""
    return model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1].float()


def position_figures(student: torch.Tensor, teacher: torch.Tensor, negative: torch.Tensor,
                     response: list[int], divergence: str) -> dict[str, torch.Tensor]:
    """Per-position figures of one trace (see the module's docstring)."""
    from dail.training.loss import contrastive_kl_with_grad

    log_s, log_t = F.log_softmax(student, -1), F.log_softmax(teacher, -1)
    p_s, q = log_s.exp(), log_t.exp()
    target = torch.tensor(response)[:, None]
    rows = torch.arange(len(response))
    push = {name: -contrastive_kl_with_grad(student, teacher, None, gamma=0.0, divergence=name)[2].gather(
        -1, target)[:, 0] for name in {divergence, "reverse", "forward"}}
    return {
        "p_student": p_s.gather(-1, target)[:, 0], "p_teacher": q.gather(-1, target)[:, 0],
        "teacher_tail": 1 - q.max(-1).values, "student_mass_in_teacher_tail": (p_s * (q < TAIL)).sum(-1),
        "reverse_kl": (p_s * (log_s - log_t)).sum(-1), "forward_kl": (q * (log_t - log_s)).sum(-1),
        "reverse_kl_negative": (p_s * (log_s - F.log_softmax(negative, -1))).sum(-1),
        "push_on_trace_token": push[divergence], "reverse_push": push["reverse"], "forward_push": push["forward"],
        "student_top_p": p_s.max(-1).values, "teacher_p_of_student_top": q.gather(-1, student.argmax(-1, keepdim=True))[:, 0],
        "student_argmax_is_trace_token": (student.argmax(-1) == rows.new_tensor(
            response)).float(),
    }


def measure(model: Any, examples: list[dict[str, Any]], divergence: str, gamma: float) -> dict[str, Any]:
    """Figures by group of positions and gradient norms of each term, at the model's weights."""
    from dail.training.loss import token_divergence

    params = [p for p in model.parameters() if p.requires_grad]
    total = sum(len(e["response"]) for e in examples)
    grads = {term: [torch.zeros_like(p) for p in params] for term in ("positive", "negative", "nll")}
    figures: dict[str, list[float]] = {}
    groups: list[str] = []
    for e in examples:
        prompts, response = e["prompt_ids"], e["response"]
        with torch.no_grad(), model.disable_adapter():
            teacher = response_logits(model, prompts["privileged"], response)
            negative = response_logits(model, prompts["negative"], response)
        student = response_logits(model, prompts["student"], response)
        terms = {"positive": token_divergence(student, teacher, divergence=divergence).sum() / total,
                 "negative": gamma * token_divergence(student, negative, divergence=divergence).sum() / total,
                 "nll": F.cross_entropy(student, torch.tensor(response), reduction="sum") / total}
        for term, value in terms.items():
            for acc, g in zip(grads[term], torch.autograd.grad(value, params, retain_graph=True), strict=True):
                acc.add_(g)
        with torch.no_grad():
            for key, values in position_figures(student.detach(), teacher, negative, response, divergence).items():
                figures.setdefault(key, []).extend(values.tolist())
        groups += e["groups"]
    by_group: dict[str, dict[str, float]] = {}
    for group in GROUPS:
        index = [i for i, g in enumerate(groups) if g == group]
        if not index:
            continue
        row: dict[str, float] = {"positions": len(index)}
        for key, values in figures.items():
            row[key] = statistics.fmean(values[i] for i in index)
        p = [figures["p_student"][i] for i in index]
        row["p_student_median"] = statistics.median(p)
        row["p_student_below_0.01"] = sum(x < 0.01 for x in p) / len(p)
        # Locked positions: the student all but rules out the trace token; what each loss does there.
        locked = [i for i in index if figures["p_student"][i] < 0.01]
        for key in ("student_top_p", "teacher_p_of_student_top", "reverse_push", "forward_push"):
            row[f"locked_{key}"] = statistics.fmean(figures[key][i] for i in locked) if locked else None
        by_group[group] = row
    norms = {term: float(torch.sqrt(sum((g.float() ** 2).sum() for g in gs))) for term, gs in grads.items()}
    positive_mean = sum(figures["reverse_kl" if divergence == "reverse" else "forward_kl"]) / total
    return {"by_group": by_group, "grad_norm": norms, "positions": total,
            "mean_reverse_kl": sum(figures["reverse_kl"]) / total, "mean_forward_kl": sum(figures["forward_kl"]) / total,
            "mean_positive_term": positive_mean}


def accuracy(model: Any, tokenizer: Any, n_test: int, n_samples: int) -> dict[str, float]:
    """Sampled pass@1/pass@n on held-out novel problems and pass@1 on known types."""
    from dail.world import generator as gen
    from dail.world.validity import pass_rates

    novel = [p for kind in gen.NOVEL_TYPES for p in gen.generate(kind, n_test // 2, split="test", seed=0)]
    known = [p for kind in gen.KNOWN_TYPES for p in gen.generate(kind, 2, split="test", seed=0)]
    rates = pass_rates(model, tokenizer, novel, "student", n=n_samples, ks=(1, n_samples))
    return {"novel": rates, "known_pass@1": pass_rates(model, tokenizer, known, "student", n=4)["pass@1"]}


def checkpoints(out: Path) -> list[tuple[int, Path | None]]:
    """(step, adapter folder) from step 0 (the fresh adapter: the base model) to the last checkpoint."""
    found = sorted((int(p.name.split("-")[1]), p) for p in (out / "checkpoints").glob("checkpoint-*") if p.is_dir())
    return [(0, None), *found]


def trajectory(setting: Setting, out: Path, examples: list[dict[str, Any]], tokenizer: Any,
               args: argparse.Namespace) -> list[dict[str, Any]]:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, set_seed

    from dail import world

    points = []
    for step, folder in checkpoints(out):
        base = AutoModelForCausalLM.from_pretrained(world.base_model_dir())
        if folder is None:
            set_seed(setting.seed)  # the adapter's initial weights, as training draws them (B = 0)
            model = get_peft_model(base, LoraConfig(r=setting.lora_r, lora_alpha=setting.lora_r,
                                                    target_modules=setting.target_modules, task_type="CAUSAL_LM"))
        else:
            model = PeftModel.from_pretrained(base, folder, is_trainable=True)
        model.eval()
        point = {"step": step, **measure(model, examples, setting.divergence, setting.gamma)}
        with torch.no_grad():
            point["accuracy"] = accuracy(model, tokenizer, args.n_test, args.n_samples)
        logger.info("%s step %d: %s", setting.name, step, json.dumps(
            {"grad_norm": point["grad_norm"], "accuracy": point["accuracy"]}))
        points.append(point)
    return points


def table(name: str, result: dict[str, Any]) -> str:
    """Markdown tables of one run's trajectory."""
    top = [key for key in result["trajectory"][0]["accuracy"]["novel"] if key != "pass@1"][-1]
    lines = [f"## {name}", "", f"| step | pass@1 | {top} | known pass@1 | mean positive term | |grad| positive | "
             "|grad| gamma x negative | |grad| NLL |", "|---|---|---|---|---|---|---|---|"]
    for p in result["trajectory"]:
        a, g = p["accuracy"], p["grad_norm"]
        lines.append(f"| {p['step']} | {a['novel']['pass@1']:.3f} | {a['novel'][top]:.3f} | {a['known_pass@1']:.2f} | "
                     f"{p['mean_positive_term']:.3f} | {g['positive']:.3g} | {g['negative']:.3g} | {g['nll']:.3g} |")
    lines += ["", "| step | positions | n | p student (mean / median / < 0.01) | p teacher | teacher tail | "
              "student mass in teacher tail | reverse KL | forward KL | push on trace token | student argmax right |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in result["trajectory"]:
        for group, r in p["by_group"].items():
            lines.append(
                f"| {p['step']} | {group} | {r['positions']} | {r['p_student']:.3f} / {r['p_student_median']:.3f} / "
                f"{r['p_student_below_0.01']:.2f} | {r['p_teacher']:.3f} | {r['teacher_tail']:.3f} | "
                f"{r['student_mass_in_teacher_tail']:.3f} | {r['reverse_kl']:.3f} | {r['forward_kl']:.3f} | "
                f"{r['push_on_trace_token']:.4f} | {r['student_argmax_is_trace_token']:.3f} |")
    lines += ["", "Locked positions (the student gives the trace token < 0.01):", "",
              "| step | positions | share | student's top p | teacher p of it | reverse push | forward push |",
              "|---|---|---|---|---|---|---|"]
    for p in result["trajectory"]:
        for group, r in p["by_group"].items():
            if r.get("locked_student_top_p") is not None:
                lines.append(f"| {p['step']} | {group} | {r['p_student_below_0.01']:.2f} | {r['locked_student_top_p']:.3f} | "
                             f"{r['locked_teacher_p_of_student_top']:.4f} | {r['locked_reverse_push']:.4f} | "
                             f"{r['locked_forward_push']:.4f} |")
    logged = [h for h in result["log_history"] if "kl_privileged" in h]
    if logged:
        lines += ["", "Trainer log (every 10 steps): step: loss, positive term, negative term, grad norm", "",
                  "; ".join(f"{h['step']}: {h['loss']:.3f}, {h['kl_privileged']:.3f}, {h.get('kl_negative', 0):.3f}, "
                            f"{h.get('grad_norm', float('nan')):.3g}" for h in logged)]
    return "\n".join(lines + [""])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.world_mechanism", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/mechanism")
    parser.add_argument("--demo-root", default="runs/demo", help="the demo's output folder (its traces are reused)")
    parser.add_argument("--divergence", nargs="+", default=["reverse", "forward"])
    parser.add_argument("--learning-rate", nargs="+", type=float, default=[1e-3])
    parser.add_argument("--epochs", nargs="+", type=float, default=[5.0])
    parser.add_argument("--lora-r", nargs="+", type=int, default=[32])
    parser.add_argument("--lora-target-modules", nargs="+", default=["all-linear"])
    parser.add_argument("--gamma", type=float, default=0.1)
    parser.add_argument("--every", type=int, default=49, help="steps between checkpoints (49: one epoch)")
    parser.add_argument("--probe", type=int, default=24, help="training traces probed")
    parser.add_argument("--n-test", type=int, default=8, help="held-out novel problems sampled per checkpoint")
    parser.add_argument("--n-samples", type=int, default=8)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    from dail import models, world
    from dail.config import ModelConfig, resolve_divergence

    divergences = [resolve_divergence(d) for d in args.divergence]  # a bad name stops here
    root = Path(args.out)
    traces = demo_traces(Path(args.demo_root))
    tokenizer = models.load_tokenizer(ModelConfig(model=str(world.base_model_dir())))
    examples = probe_examples(traces, tokenizer, args.probe)
    settings = [Setting(d, lr, ep, r, args.gamma, tuple(args.lora_target_modules)) for d in divergences for lr in args.learning_rate
                for ep in args.epochs for r in args.lora_r]
    for setting in settings:
        out = root / setting.name
        path = out / "mechanism.json"
        if path.exists():
            continue
        train(setting, traces, out, args.every)
        summary = json.loads((out / "train_summary.json").read_text())
        result = {"setting": asdict(setting), "traces": traces, "probe_traces": len(examples),
                  "trainable_share": summary.get("trainable_share"),
                  "log_history": summary["log_history"], "trajectory": trajectory(setting, out, examples,
                                                                                 tokenizer, args)}
        from dail.data import write_json_atomic

        write_json_atomic(path, result)
    from dail.data import write_text_atomic

    done = sorted(root.glob("*/mechanism.json"))
    write_text_atomic(root / "mechanism.md", "\n".join(
        table(p.parent.name, json.loads(p.read_text())) for p in done))
    logger.info("wrote %s", root / "mechanism.md")


if __name__ == "__main__":
    main()
