"""How hard each divergence pulls a confident student towards a teacher that disagrees.

    python -m bench.divergence_push

One position, the case docs/world.md finds at a quarter of the method's hard positions: the
teacher puts 0.998 on its token, the student puts p on it and the rest on a token of its own.
Prints, for each divergence of the loss (dail.training.loss.token_divergence) and each p, the
push on the teacher's token's logit: minus the gradient of the divergence with respect to it.
Exact arithmetic on one position; no model, no timing.
"""

from __future__ import annotations

import argparse

import torch

from dail.training.loss import token_divergence

VOCAB = 10
TEACHER_TOP = 0.998
STUDENT_TAIL = 1e-4


def one_position(p: float, top: float, tail: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher logits: token 0 is the student's own, token 1 the teacher's."""
    rest = VOCAB - 2
    student = torch.tensor([1 - p - tail, p] + [tail / rest] * rest, dtype=torch.float64)
    teacher = torch.tensor([(1 - top) / 2, top] + [(1 - top) / 2 / rest] * rest, dtype=torch.float64)
    return student.log()[None], teacher.log()[None]


def push(p: float, divergence: str) -> float:
    student, teacher = one_position(p, TEACHER_TOP, STUDENT_TAIL)
    student.requires_grad_(True)
    token_divergence(student, teacher, divergence=divergence).sum().backward()
    return -student.grad[0, 1].item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--divergence", nargs="+",
                        default=["forward", "jsd:0.1", "jsd:0.5", "jsd:0.9", "reverse"])
    parser.add_argument("--p", nargs="+", type=float, default=[0.5, 0.1, 0.01, 0.001])
    args = parser.parse_args(argv)
    print("| student p(teacher's token) | " + " | ".join(args.divergence) + " |")
    print("|---" * (len(args.divergence) + 1) + "|")
    for p in args.p:
        print(f"| {p:g} | " + " | ".join(f"{push(p, d):.4f}" for d in args.divergence) + " |")


if __name__ == "__main__":
    main()
