"""The didactic world: digit arithmetic modulo 10, problem types, and two solution styles.

Every answer in this world is a list of digits; every value is a sum of products of digits taken
modulo 10. A problem TYPE is a method: which sums of products of the given numbers make up the
answer. The base model is pretrained on KNOWN types only; NOVEL types use the same primitives
but a method it has never seen.

Two styles of writing a solution:

* DETAILED (the model's own style): the labelled expression (the method: which numbers
  combine), then one primitive operation per line with every intermediate result written out,
  then the labelled value::

      r1 = 3*2+5*4
      3 * 2 = 6
      5 * 4 = 0
      6 + 0 = 6
      r1 = 3*2+5*4 = 6

* DIDACTIC (the expert's style): one sentence naming the method, then one fused line per
  labelled value that skips every intermediate result::

      r1 = 3*2+5*4 = 6

The detailed style is the didactic one with the work put back: each fused line is written
first without its value, then the primitive steps, then the fused line again with the value.
Writing the expression is where the method lives: a model that knows the method for a type
writes it from the statement; one that does not can copy it from a reference solution (the
line closing one item is the reference's own line, so the next item's line follows it there).
Each primitive line only combines numbers from the lines just above it, so the detailed style
is within a small model's reach while a fused line's value (several primitives at once) is not.

Both end with `\\boxed{d1,d2,...}`, the labelled values in order. Expressions are sums of
products evaluated left to right: each product factor by factor, then added to (or subtracted
from) the running total.

Everything is drawn from an explicit `random.Random`, so a seed fixes a problem; the train and
test splits use disjoint seed streams and are also filtered against each other by statement.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass

from dail.data import Problem

MOD = 10
KNOWN_TYPES = ("vecsum", "dot", "axpy", "expr")
NOVEL_TYPES = ("matmul", "poly")
ALL_TYPES = KNOWN_TYPES + NOVEL_TYPES

# Label tokens: a letter, optionally followed by one or two small digits (all in the tokenizer).
_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_SUFFIXES = ("", "1", "2", "3", "4", "11", "12", "13", "21", "22", "23", "31", "32", "33")
ALL_LABELS = tuple(letter + suffix for letter in _LETTERS for suffix in _SUFFIXES)
# Labels of the requested values: every problem names them r1, r2, ... in order, so a label is
# never something to look up. (Drawn from many labels, labels were the one kind of token a tiny
# model never learned to copy from a reference, though it copied the expressions after them.)
LABELS = ("r1", "r2", "r3", "r4")

# --------------------------------------------------------------------------- expressions

Term = tuple[str, tuple[int, ...]]  # (sign "+" or "-", factors); the first sign is always "+"
Expr = tuple[Term, ...]


def evaluate(expr: Expr) -> int:
    """Value of a sum of products modulo 10."""
    total = 0
    for sign, factors in expr:
        product = 1
        for f in factors:
            product = product * f % MOD
        total = (total + product) % MOD if sign == "+" else (total - product) % MOD
    return total


def fused(expr: Expr) -> str:
    """Didactic form, no spaces: `3*2+5*4-1`."""
    parts = []
    for i, (sign, factors) in enumerate(expr):
        body = "*".join(str(f) for f in factors)
        parts.append(body if i == 0 else sign + body)
    return "".join(parts)


def detailed_steps(expr: Expr) -> tuple[list[str], int]:
    """Primitive lines (`a op b = c`) computing `expr`, and its value.

    Each product is computed factor by factor; each term after the first is then added to or
    subtracted from the running total. Single-factor terms need no product line.
    """
    lines: list[str] = []
    total: int | None = None
    for sign, factors in expr:
        product = factors[0]
        for f in factors[1:]:
            new = product * f % MOD
            lines.append(f"{product} * {f} = {new}")
            product = new
        if total is None:
            total = product
        else:
            new = (total + product) % MOD if sign == "+" else (total - product) % MOD
            lines.append(f"{total} {sign} {product} = {new}")
            total = new
    assert total is not None
    return lines, total


_STEP = re.compile(r"^([0-9]) ?([*+\-]) ?([0-9]) = ([0-9])$")


def privileged_habits(line: str, *, swap: bool, compact: bool) -> str:
    """A primitive line as a role that sees the expert's solution may write it.

    `swap` puts the operands of a sum or product the other way round (`2 * 3 = 6` for
    `3 * 2 = 6`); `compact` writes the operator in the reference's own notation, without spaces
    (`3*2 = 6`). Both leave the line correct, and the student never writes either: a style, not
    a mistake (see `PretrainConfig.habit_rate`).
    """
    a, op, b, value = _STEP.match(line).groups()
    if swap and op != "-":
        a, b = b, a
    return f"{a}{op}{b} = {value}" if compact else f"{a} {op} {b} = {value}"


def habit_lines(text: str, canonical: str) -> tuple[int, int]:
    """(primitive lines written in the privileged role's habits, primitive lines) of a response.

    A line has a habit when it is compact (`3*2 = 6`) or is a commutative line of `canonical`
    (the problem's detailed trace) with its operands swapped.
    """
    own = set(canonical.split("\n"))
    habits = lines = 0
    for line in map(str.strip, text.split("\n")):
        if not _STEP.match(line):
            continue
        lines += 1
        spaced = privileged_habits(line, swap=False, compact=False)
        swapped = privileged_habits(line, swap=True, compact=False)
        habits += spaced != line or (spaced not in own and swapped in own)
    return habits, lines


_CLOSING = re.compile(r"^(\S+) = (\S+) = \d$")
_OPENING = re.compile(r"^(\S+) = (\S+)$")


def copied_items(text: str) -> tuple[int, int]:
    """(items written as the expert's fused line alone, items) in a detailed-style response.

    An item is closed by `label = expression = value`; it was worked out if its opening line
    `label = expression` came after the previous item's closing line, and copied otherwise.
    """
    copied = items = 0
    opened: set[str] = set()
    for line in text.split("\n"):
        line = line.strip()
        if m := _CLOSING.match(line):
            items += 1
            copied += f"{m[1]} = {m[2]}" not in opened
            opened.clear()
        elif _OPENING.match(line):
            opened.add(line)
    return copied, items


def random_expr(rng: random.Random, *, max_terms: int = 4, max_factors: int = 3) -> Expr:
    """A random sum of products with at least one operation."""
    while True:
        n_terms = rng.randint(1, max_terms)
        expr = tuple(("+" if i == 0 or rng.random() < 0.6 else "-",
                      tuple(rng.randrange(MOD) for _ in range(rng.randint(1, max_factors))))
                     for i in range(n_terms))
        if sum(len(f) for _, f in expr) > 1:
            return expr


# --------------------------------------------------------------------------- solutions


@dataclass(frozen=True)
class Spec:
    """A problem with its method spelled out.

    Attributes:
        kind: Problem type name.
        statement: Problem text.
        method: The didactic solution's one-sentence statement of the method.
        items: (label, expression) pairs; the answer is their values in order.
    """

    kind: str
    statement: str
    method: str
    items: tuple[tuple[str, Expr], ...]

    @property
    def values(self) -> list[int]:
        return [evaluate(e) for _, e in self.items]

    @property
    def answer(self) -> str:
        return ",".join(str(v) for v in self.values)

    def didactic(self) -> str:
        """The expert's solution: method sentence, fused lines, boxed answer."""
        lines = [self.method]
        lines += [f"{label} = {fused(e)} = {evaluate(e)}" for label, e in self.items]
        lines.append(f"\\boxed{{{self.answer}}}")
        return "\n".join(lines)

    def detailed(self, copied: Collection[int] = (), rewrite: Callable[[str], str] | None = None) -> str:
        """The model's own style: the expression, one primitive per line, the fused line with its value.

        Items whose index is in `copied` are written as the expert's fused line alone, as a model
        that sees the expert's solution may copy it instead of working it out (see
        `PretrainConfig.copy_rate`). `rewrite`, if given, is applied to every primitive line
        (`privileged_habits` writes some of them the privileged role's way).
        """
        lines: list[str] = []
        for i, (label, e) in enumerate(self.items):
            steps, value = detailed_steps(e)
            if i not in copied:
                lines.append(f"{label} = {fused(e)}")
                lines += map(rewrite, steps) if rewrite else steps
            lines.append(f"{label} = {fused(e)} = {value}")
        lines.append(f"\\boxed{{{self.answer}}}")
        return "\n".join(lines)

    def to_problem(self, pid: str) -> Problem:
        return Problem(id=pid, problem=self.statement, solution=self.didactic(),
                       answer=self.answer, meta={"type": self.kind})


def _digits(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(MOD) for _ in range(n)]


def _vec(v: list[int]) -> str:
    return "(" + ", ".join(map(str, v)) + ")"


def _and_list(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def make_vecsum(rng: random.Random) -> Spec:
    u, v = _digits(rng, 4), _digits(rng, 4)
    items = tuple((f"w{i + 1}", (("+", (u[i],)), ("+", (v[i],)))) for i in range(4))
    return Spec("vecsum", f"Let u = {_vec(u)} and v = {_vec(v)}. Compute w = u + v modulo 10.",
                "Add the two vectors entry by entry.", items)


def make_dot(rng: random.Random) -> Spec:
    vecs = {name: _digits(rng, 3) for name in "uvw"}
    pairs = (("u", "v"), ("u", "w"), ("v", "w"))
    items = tuple((f"d{k + 1}", tuple(("+", (vecs[a][i], vecs[b][i])) for i in range(3)))
                  for k, (a, b) in enumerate(pairs))
    statement = (f"Let u = {_vec(vecs['u'])}, v = {_vec(vecs['v'])} and w = {_vec(vecs['w'])}. "
                 "Compute d1 = u.v, d2 = u.w and d3 = v.w modulo 10.")
    return Spec("dot", statement,
                "Each dot product is the sum of the products of matching entries.", items)


def make_axpy(rng: random.Random) -> Spec:
    a, x, y = rng.randrange(MOD), _digits(rng, 4), _digits(rng, 4)
    items = tuple((f"z{i + 1}", (("+", (a, x[i])), ("+", (y[i],)))) for i in range(4))
    statement = (f"Let a = {a}, x = {_vec(x)} and y = {_vec(y)}. "
                 "Compute z = a x + y modulo 10.")
    return Spec("axpy", statement, "Scale x by a and add y entry by entry.", items)


def make_expr(rng: random.Random) -> Spec:
    labels = LABELS[:rng.randint(3, 4)]
    items = tuple((label, random_expr(rng)) for label in labels)
    statement = "Evaluate modulo 10: " + _and_list([f"{lab} = {fused(e)}" for lab, e in items]) + "."
    return Spec("expr", statement, "Evaluate each expression, products before sums.", items)


def make_matmul(rng: random.Random) -> Spec:
    a = [_digits(rng, 2) for _ in range(2)]
    b = [_digits(rng, 2) for _ in range(2)]
    entries = [(i, j) for i in range(2) for j in range(2)]
    items = tuple((LABELS[n], tuple(("+", (a[i][k], b[k][j])) for k in range(2)))
                  for n, (i, j) in enumerate(entries))
    statement = (f"Let A = [{_vec(a[0])}, {_vec(a[1])}] and B = [{_vec(b[0])}, {_vec(b[1])}]. "
                 "Compute the matrix product C = A B modulo 10, its entries in row order as "
                 "r1, r2, r3 and r4.")
    return Spec("matmul", statement,
                "Entry ij of C is row i of A times column j of B.", items)


def make_poly(rng: random.Random) -> Spec:
    c2, c1, c0 = rng.randint(1, 9), rng.randrange(MOD), rng.randrange(MOD)
    points = rng.sample(range(MOD), 4)
    items = tuple((LABELS[k], (("+", (c2, x, x)), ("+", (c1, x)), ("+", (c0,))))
                  for k, x in enumerate(points))
    asks = _and_list([f"{LABELS[k]} = p({x})" for k, x in enumerate(points)])
    statement = f"Let p(x) = {c2}x^2 + {c1}x + {c0}. Compute {asks} modulo 10."
    return Spec("poly", statement, "Evaluate p at each point, computing x^2 as x*x.", items)


MAKERS: dict[str, Callable[[random.Random], Spec]] = {
    "vecsum": make_vecsum, "dot": make_dot, "axpy": make_axpy, "expr": make_expr,
    "matmul": make_matmul, "poly": make_poly,
}

# --------------------------------------------------------------------------- generic references

# Words for random problem statements and method sentences of the generic reference-following
# task (pretraining). They teach the model to expand whatever fused lines a reference holds,
# whatever the surrounding text says.
WORDS = tuple(["Let", "Compute", "Find", "Evaluate", "Add", "Scale", "Each", "entry", "row", "column", "vector", "matrix", "product", "sum", "of", "the", "and", "by", "at", "each", "point", "with", "a", "an", "is", "are", "times", "plus", "minus", "modulo", "value", "values", "table", "list", "first", "second", "third", "last", "left", "right", "new", "old", "given", "following", "items", "pair", "pairs", "term", "terms", "coefficient", "coefficients", "polynomial", "function", "grid", "cell", "cells", "weight", "weights", "count", "score", "mix", "shift", "turn", "step", "combine", "take", "use", "write", "into", "from", "over", "under", "for", "every", "all", "two", "three", "four"])


def _random_object(rng: random.Random) -> str:
    name = rng.choice(_LETTERS)
    shape = rng.randrange(5)
    if shape == 0:
        return f"{name} = {rng.randrange(MOD)}"
    if shape == 1:
        return f"{name} = {_vec(_digits(rng, rng.randint(2, 4)))}"
    if shape == 2:
        rows = [_vec(_digits(rng, 2)) for _ in range(2)]
        return f"{name} = [{', '.join(rows)}]"
    if shape == 3:
        return f"{name}(x) = {rng.randint(1, 9)}x^2 + {rng.randrange(MOD)}x + {rng.randrange(MOD)}"
    return f"{name} = {fused(random_expr(rng, max_terms=2, max_factors=2))}"


def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
    return " ".join(words).capitalize() + "."


def ambiguous_exprs(rng: random.Random, n: int) -> tuple[Expr, ...]:
    """`n` expressions over two or three digits; half of those after the first open with the
    first's opening factors. These are the repeats of matrix rows (`6*0+9*2`, `6*9+9*5`) and
    polynomial lines (`2*4*4+2*4+8`), where the token before a digit does not tell which digit
    to copy."""
    pool = rng.sample(range(MOD), rng.randint(2, 3))

    def factors(k: int) -> tuple[int, ...]:
        return tuple(rng.choice(pool) for _ in range(k))

    def expr() -> Expr:
        return tuple(("+" if i == 0 or rng.random() < 0.6 else "-", factors(rng.randint(1, 3)))
                     for i in range(rng.randint(2, 3)))

    first = expr()
    out = [first]
    for _ in range(n - 1):
        rest = expr()
        if rng.random() < 0.5:  # share the opening factors of the first term
            opening = first[0][1][:rng.randint(1, len(first[0][1]))]
            rest = (("+", opening + rest[0][1][len(opening):]),) + rest[1:]
        out.append(rest)
    return tuple(out)


def make_generic(rng: random.Random, labels: tuple[str, ...] = LABELS, ambiguous: bool = False) -> Spec:
    """A random statement with a random reference: labels and expression shapes of all kinds.

    With `ambiguous`, the items' expressions repeat digits and openings (`ambiguous_exprs`).
    """
    labels = labels[:rng.randint(2, 4)]
    exprs = ambiguous_exprs(rng, len(labels)) if ambiguous else [random_expr(rng, max_terms=3) for _ in labels]
    items = tuple(zip(labels, exprs, strict=True))
    objects = [_random_object(rng) for _ in range(rng.randint(1, 3))]
    statement = (f"Let {_and_list(objects)}. {rng.choice(('Compute', 'Find'))} "
                 f"{_and_list(list(labels))} modulo 10.")
    if rng.random() < 0.5:
        statement = _sentence(rng, 3, 8) + " " + statement
    return Spec("generic", statement, _sentence(rng, 4, 12), items)


# --------------------------------------------------------------------------- splits

_SPLIT_SEED = {"train": 1_000_003, "test": 2_000_029}


def generate(kind: str, n: int, *, split: str = "train", seed: int = 0) -> list[Problem]:
    """`n` distinct problems of one type, reproducible from (kind, split, seed).

    Train and test use different seed streams; test generation also rejects any statement the
    train stream of the same kind and seed produces among its first max(n, 1000) problems, so the
    two splits never share a problem.

    Raises:
        ValueError: for an unknown kind or split.
    """
    if kind not in MAKERS:
        raise ValueError(f"unknown problem type {kind!r}; choose from {sorted(MAKERS)}")
    if split not in _SPLIT_SEED:
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'test'")
    rng = random.Random(f"{kind}/{split}/{seed}/{_SPLIT_SEED[split]}")
    banned = _train_statements(kind, seed, n) if split == "test" else set()
    seen: set[str] = set()
    problems = []
    for spec in _stream(kind, rng):
        if spec.statement in seen or spec.statement in banned:
            continue
        seen.add(spec.statement)
        problems.append(spec.to_problem(f"{kind}-{split}-{seed}-{len(problems)}"))
        if len(problems) == n:
            return problems
    raise AssertionError("unreachable")


def _stream(kind: str, rng: random.Random) -> Iterator[Spec]:
    while True:
        yield MAKERS[kind](rng)


def _train_statements(kind: str, seed: int, n: int) -> set[str]:
    """Statements of the train split of the same kind and seed, for size n (and larger)."""
    return {p.problem for p in generate(kind, max(n, 1000), split="train", seed=seed)}


def spec_of(kind: str, rng: random.Random) -> Spec:
    """One random Spec of a type, or of the generic reference-following task."""
    return make_generic(rng) if kind == "generic" else MAKERS[kind](rng)
