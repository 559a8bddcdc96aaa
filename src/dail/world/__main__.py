"""`dail world pretrain|validity|diagnose|export` (or `python -m dail.world ...`): the world's command line."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from dataclasses import fields


def main(argv: list[str] | None = None, *, prog: str = "python -m dail.world") -> int:
    """Parse the command and dispatch; heavy modules are imported lazily.

    Args:
        argv: The arguments after the program name.
        prog: The name usage and help messages give the command (`dail world` from `dail`).
    """
    from dail.config import ConfigError
    from dail.data import DataError

    parser = build_parser(prog)
    args = None
    try:
        args = parser.parse_args(argv)
        return _run(parser, args, argv)
    except SystemExit as e:  # a bad argument (said in one line) or --help
        return e.code if isinstance(e.code, int) else 0
    except (DataError, ConfigError) as e:
        print(f"{parser.prog} {args.command}: error: {e}", file=sys.stderr)
        return 2


def build_parser(prog: str = "python -m dail.world") -> argparse.ArgumentParser:
    from dail.validation import Number, OneLineParser, PathArg
    from dail.world import ALL_TYPES

    parser = OneLineParser(prog=prog, description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    from dail.world.pretrain import PretrainConfig

    pre = sub.add_parser("pretrain", help="pretrain the base model from scratch (CPU)",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(PretrainConfig):
        kind = type(f.default)
        if kind in (int, float):
            kind = Number(kind, **f.metadata.get("range", {}))
        elif f.name in ("out", "work"):
            kind = PathArg("folder", exists=False)
        pre.add_argument("--" + f.name.replace("_", "-"), default=f.default, help=f.metadata.get("help"), type=kind)

    count, seed = Number(int, low=1), Number(int, low=0)
    val = sub.add_parser("validity", help="measure the gap on a saved model")
    val.add_argument("--model", default=None, type=PathArg("folder"),
                     help="model directory (default: committed base)")
    val.add_argument("--n-problems", type=count, default=32)
    val.add_argument("--n-samples", type=count, default=64)
    val.add_argument("--seed", type=seed, default=0)
    val.add_argument("--out", default=None, type=PathArg("file", exists=False),
                     help="also write the numbers to this JSON file")

    dia = sub.add_parser("diagnose", help="teacher-forced token errors by kind of token")
    dia.add_argument("--model", default=None, type=PathArg("folder"),
                     help="model directory (default: committed base)")
    dia.add_argument("--n-problems", type=count, default=8)
    dia.add_argument("--seed", type=seed, default=0)
    dia.add_argument("--split", choices=("train", "test"), default="test")
    dia.add_argument("--adapter", default=None, type=PathArg("folder"),
                     help="a trained LoRA adapter to apply (e.g. from `dail demo`)")

    exp = sub.add_parser("export", help="write problems as JSONL for `dail generate/train/eval`")
    exp.add_argument("path", type=PathArg("file", exists=False))
    exp.add_argument("--split", choices=("train", "test"), default="train")
    exp.add_argument("--kind", default="novel", choices=("novel", "known", *ALL_TYPES),
                     help="novel, known, or one type name")
    exp.add_argument("--n", type=count, default=64)
    exp.add_argument("--seed", type=seed, default=0)

    return parser


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str] | None) -> int:
    if args.command == "validity":
        from dail.world.validity import too_few_samples

        if problem := too_few_samples(args.n_samples, "--n-samples"):  # before the model is loaded
            parser.error(problem)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.command == "pretrain":
        from dail.world.pretrain import PretrainConfig, run

        try:
            cfg = PretrainConfig(**{f.name: getattr(args, f.name) for f in fields(PretrainConfig)})
        except ValueError as error:
            parser.error(str(error))
        command = shlex.join(["dail", "world", *(sys.argv[1:] if argv is None else argv)])
        print(run(cfg, command=command))
    elif args.command == "validity":
        from dail.world import base_model_dir
        from dail.world.validity import load, validity

        model, tokenizer = load(args.model or str(base_model_dir()))
        result = validity(model, tokenizer, n_problems=args.n_problems,
                          n_samples=args.n_samples, seed=args.seed)
        text = json.dumps(result, indent=2)
        if args.out:
            from dail.data import write_text_atomic

            write_text_atomic(args.out, text + "\n")
        print(text)
    elif args.command == "diagnose":
        from dail.world import base_model_dir
        from dail.world.validity import CATEGORIES, diagnose, load

        model, tokenizer = load(args.model or str(base_model_dir()))
        if args.adapter:
            from dail.models import apply_adapter

            model = apply_adapter(model, args.adapter)
        table = diagnose(model, tokenizer, n_problems=args.n_problems, seed=args.seed, split=args.split)
        for metric, title in (("error_rate", "next-token error rate"), ("nll", "mean next-token NLL")):
            print(f"{title} (teacher-forced detailed trace, {args.split} problems)")
            print(f"{'type/role':<22}" + "".join(f"{c:>14}" for c in CATEGORIES))
            for name, row in table.items():
                cells = [f"{row[c][metric]:>14.3f}" if c in row else f"{'-':>14}" for c in CATEGORIES]
                print(f"{name:<22}" + "".join(cells))
    elif args.command == "export":
        from dail.world import export_problems

        n = export_problems(args.path, split=args.split, kind=args.kind, n=args.n, seed=args.seed)
        print(f"wrote {n} problems to {args.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
