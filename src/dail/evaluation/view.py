"""`dail view`: one self-contained HTML page showing where every token of the traces came from.

Each response token is one `<span data-source="S|P">`: S where the student's proposal was
accepted, P where the privileged model sampled the token. Hovering a token shows the student's
proposal and its privileged probability. Per problem the page gives the mean acceptance rate,
the gold answer and how many traces are correct; a menu filters by problem. The page has no
external resources (inline CSS and JS), so it opens anywhere, offline.
"""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dail.data import DataError, group_by_problem, iter_jsonl, write_text_atomic

logger = logging.getLogger(__name__)

#: Traces shown per problem unless asked otherwise (a page of every trace of a large run would
#: be too large to open).
DEFAULT_PER_PROBLEM = 4


def load_traces(path: str | Path, check: Callable[[str, dict[str, Any], list[list[int]]], None] | None = None
                ) -> list[dict[str, Any]]:
    """Trace records with the fields the page needs, checked line by line (and by `check`, given
    each record's place, the record and its token ids).

    Raises:
        DataError: a record without `id`, `token_ids` or a `sources` string of the same length.
    """
    records = []
    for where, row in iter_jsonl(path):
        if not isinstance(row, dict) or "id" not in row:
            raise DataError(f"{where}: field 'id' is missing (is this a trace file from `dail generate`?)")
        ids, sources = row.get("token_ids"), row.get("sources")
        if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
            raise DataError(f"{where}: field 'token_ids' must be a list of token ids")
        if not isinstance(sources, str) or len(sources) != len(ids) or set(sources) - {"S", "P"}:
            raise DataError(f"{where}: field 'sources' must hold one S or P per token ({len(ids)})")
        if check is not None:
            check(where, row, [ids])
        records.append({**row, "id": str(row["id"])})
    if not records:
        raise DataError(f"{path}: no traces")
    return records


def token_pieces(tokenizer: Any, ids: Sequence[int], *, window: int = 6) -> list[str]:
    """The text each token adds to the decoded response, one string per token.

    Decoding a token alone can lose a leading space (SentencePiece) or split a character across
    tokens (byte-level BPE), so each piece is the difference between decoding a few preceding
    tokens with and without it. A token ending inside a character gets "" and the token that
    completes the character gets all of it.
    """
    pieces: list[str] = []
    done = 0  # tokens whose text has been emitted
    for j in range(len(ids)):
        start = max(0, done - window)
        before = tokenizer.decode(ids[start:done])
        after = tokenizer.decode(ids[start:j + 1])
        if after.endswith("\ufffd") and j + 1 - done < 4 and j + 1 < len(ids):
            pieces.append("")
            continue
        pieces.append(after[len(before):] if after.startswith(before) else tokenizer.decode(ids[done:j + 1]))
        done = j + 1
    return pieces


# Control characters (other than tab and newline) as their visible pictures: an HTML page would
# drop NUL and turn CR into a newline, hiding tokens a model did produce.
_VISIBLE = {c: 0x2400 + c for c in range(32) if c not in (9, 10)} | {127: 0x2421}


def _shown(text: str) -> str:
    return html.escape(text.translate(_VISIBLE))


def _token_spans(tokenizer: Any, trace: dict[str, Any]) -> str:
    ids, sources = trace["token_ids"], trace["sources"]
    proposals = trace.get("proposal_ids") or []
    probs = trace.get("proposal_probs") or []
    spans = []
    for j, (piece, source) in enumerate(zip(token_pieces(tokenizer, ids), sources, strict=True)):
        attrs = [f'data-source="{source}"']
        proposal = proposals[j] if j < len(proposals) else None
        prob = probs[j] if j < len(probs) else None
        if proposal is not None:
            attrs.append(f'data-proposal="{_shown(tokenizer.decode([proposal]))}"')
        if prob is not None:
            attrs.append(f'data-prob="{prob:.4f}"')
        spans.append(f"<span {' '.join(attrs)}>{_shown(piece)}</span>")
    return "".join(spans)


def _correct_mark(value: Any) -> str:
    return {True: "correct", False: "wrong"}.get(value, "not graded")


def _problem_section(tokenizer: Any, pid: str, traces: list[dict[str, Any]], per_problem: int) -> str:
    shown = traces[:per_problem] if per_problem else traces
    rates = [t["acceptance_rate"] for t in traces if isinstance(t.get("acceptance_rate"), int | float)]
    graded = [t for t in traces if t.get("correct") is not None]
    correct = f"{sum(bool(t['correct']) for t in graded)} of {len(graded)} traces correct" if graded \
        else "no gold answer: not graded"
    acceptance = f"{sum(rates) / len(rates):.3f}" if rates else "n/a"
    gold = traces[0].get("gold")
    parts = [f'<section class="problem" data-problem="{html.escape(pid)}">',
             f"<h2>Problem {html.escape(pid)}</h2>",
             '<p class="stats">'
             f'mean acceptance <b class="acceptance">{acceptance}</b> · gold answer '
             f'<b class="gold">{html.escape(str(gold)) if gold is not None else "none"}</b> · '
             f'<span class="correctness">{correct}</span>'
             f'{f" · showing {len(shown)} of {len(traces)} traces" if len(shown) < len(traces) else ""}</p>']
    for trace in shown:
        rate = trace.get("acceptance_rate")
        answer = trace.get("answer")
        parts += [f'<div class="trace" data-sample="{html.escape(str(trace.get("sample")))}">',
                  f'<div class="meta">sample {html.escape(str(trace.get("sample")))} · acceptance '
                  f'{f"{rate:.3f}" if isinstance(rate, int | float) else "n/a"} · answer '
                  f'<b>{html.escape(str(answer)) if answer is not None else "none"}</b> · '
                  f'<span class="{_correct_mark(trace.get("correct")).replace(" ", "-")}">'
                  f'{_correct_mark(trace.get("correct"))}</span>'
                  f'{"" if trace.get("finished", True) else " · unfinished (hit the token budget)"}</div>',
                  f'<div class="tokens">{_token_spans(tokenizer, trace)}</div>', "</div>"]
    parts.append("</section>")
    return "\n".join(parts)


def build_page(records: list[dict[str, Any]], tokenizer: Any, *, per_problem: int = DEFAULT_PER_PROBLEM,
               title: str = "traces", tau: float | None = None) -> str:
    """The HTML page of `records` (trace records as `dail generate` writes them).

    Args:
        records: Trace records.
        tokenizer: The tokenizer that produced the token ids (decodes each token).
        per_problem: Traces shown per problem, in sample order (0: all).
        title: Page title (the traces file's name).
        tau: The acceptance threshold, when known (shown in the legend).
    """
    groups = group_by_problem(records)
    sections = [_problem_section(tokenizer, pid, sorted(traces, key=lambda t: t.get("sample", 0)), per_problem)
                for pid, traces in groups.items()]
    options = "".join(f'<option value="{html.escape(pid)}">{html.escape(pid)}</option>' for pid in groups)
    threshold = f" &ge; tau = {tau}" if tau is not None else " &ge; tau"
    return _PAGE.format(
        title=html.escape(title), css=_CSS, script=_SCRIPT, options=options, sections="\n".join(sections),
        summary=f"{len(records)} traces of {len(groups)} problems", threshold=threshold)


def run(traces: str, out: str, *, model: str | None = None, per_problem: int = DEFAULT_PER_PROBLEM) -> Path:
    """Write the page of a traces file to `out`; the tokenizer is `model`'s, or that of the model
    recorded in `generate_config.json` beside the traces."""
    from dail import models
    from dail.config import ModelConfig
    from dail.provenance import TraceTokenizerCheck

    settings = _generate_settings(Path(traces))
    name = model or (settings.get("model") or {}).get("model")
    if not name:
        load_traces(traces)  # a file that is no trace file says so first
        raise DataError(f"{traces}: no generate_config.json beside it names the model; pass --model "
                        "(its tokenizer turns the token ids into text)")
    tokenizer = models.load_tokenizer(ModelConfig(model=name))
    check = TraceTokenizerCheck(tokenizer, name, "view them with the model that wrote them")
    records = load_traces(traces, check=check)
    page = build_page(records, tokenizer, per_problem=per_problem, title=Path(traces).name, tau=settings.get("tau"))
    write_text_atomic(out, page)
    logger.info("wrote %s (%d traces of %d problems)", out, len(records), len(group_by_problem(records)))
    return Path(out)


def _generate_settings(traces: Path) -> dict[str, Any]:
    path = traces.parent / "generate_config.json"
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return settings if isinstance(settings, dict) else {}


_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 70em; color: #222; }
header { position: sticky; top: 0; background: #fff; padding: .5em 0; border-bottom: 1px solid #ddd; }
.legend span { padding: 0 .4em; border-radius: 3px; }
section.problem { margin: 1.5em 0; }
.trace { margin: .8em 0; padding: .6em; border: 1px solid #e3e3e3; border-radius: 4px; }
.meta { color: #555; margin-bottom: .4em; }
.tokens { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 13px; }
span[data-source] { border-radius: 2px; cursor: default; border-right: 1px solid #fff; }
span[data-source="S"] { background: #d4eed1; }
span[data-source="P"] { background: #fbd5b5; }
span[data-source]:hover { outline: 2px solid #333; }
.correct { color: #1a7f37; } .wrong { color: #b42318; } .not-graded { color: #777; }
#tip { position: fixed; display: none; max-width: 28em; background: #222; color: #fff; padding: .4em .6em;
       border-radius: 4px; font-size: 12px; pointer-events: none; white-space: pre-wrap; z-index: 10; }
"""

# Builds the hover text from the token's data attributes; the menu hides other problems.
_SCRIPT = """
const tip = document.getElementById('tip');
function show(text) { return JSON.stringify(text); }
document.addEventListener('mouseover', (event) => {
  const token = event.target.closest('span[data-source]');
  if (!token) { tip.style.display = 'none'; return; }
  const d = token.dataset, lines = [];
  lines.push(d.source === 'S' ? 'S: the student\\'s proposal, accepted' : 'P: sampled by the privileged model');
  lines.push('token: ' + show(token.textContent));
  if (d.proposal !== undefined) {
    lines.push('student proposed: ' + show(d.proposal));
    lines.push('privileged probability of the proposal: ' + (d.prob !== undefined ? d.prob : 'n/a'));
  } else {
    lines.push('no proposal: no token had privileged probability >= tau here');
  }
  tip.textContent = lines.join('\\n');
  tip.style.display = 'block';
  const box = token.getBoundingClientRect();
  tip.style.left = Math.min(box.left, window.innerWidth - 320) + 'px';
  tip.style.top = (box.bottom + 6) + 'px';
});
document.getElementById('problem-filter').addEventListener('change', (event) => {
  const wanted = event.target.value;
  for (const section of document.querySelectorAll('section.problem')) {
    section.style.display = (wanted === '' || section.dataset.problem === wanted) ? '' : 'none';
  }
});
"""

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>{css}</style></head>
<body>
<header><h1>{title}</h1>
<p>{summary}. <span class="legend"><span style="background:#d4eed1">S</span> the student's proposal,
accepted (privileged probability{threshold}) <span style="background:#fbd5b5">P</span> sampled by the
privileged model. Hover a token for the student's proposal and its privileged probability.</span></p>
<label>Problem <select id="problem-filter"><option value="">all problems</option>{options}</select></label>
</header>
{sections}
<div id="tip" role="tooltip"></div>
<script>{script}</script>
</body></html>
"""
