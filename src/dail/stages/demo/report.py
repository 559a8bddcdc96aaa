"""The demo's report: report.md (validity, the comparison's tables, rollouts, settings), the
command line that reproduces it, and the plots."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dail.stages.demo.settings import QUICK, SOURCES, DemoSettings


def _ks(results: dict[str, Any]) -> list[str]:
    from dail.evaluation.report import pass_at_k_keys

    return pass_at_k_keys(next(iter(results["methods"].values())))


def command_of(settings: dict[str, Any]) -> str:
    """The `dail demo` command line that gives these settings (Python API beyond its flags)."""
    quick = settings["n_train"] < 50
    default = json.loads(json.dumps(asdict(QUICK if quick else DemoSettings())))  # tuples as lists
    flags = {"divergence": "--divergence", "gamma": "--gamma", "learning_rate": "--learning-rate",
             "seed": "--seed", "seeds": "--seeds", "lora_r": "--lora-r",
             "lora_target_modules": "--lora-target-modules", "backend": "--backend"}
    changed = {k: v for k, v in json.loads(json.dumps(settings)).items() if default.get(k) != v}
    if set(changed) - set(flags):
        return f"dail.stages.demo.run(settings=DemoSettings(**{changed}))"
    return " ".join(["dail demo", *(["--quick"] if quick else []),
                     *(f"{flags[k]} {' '.join(v) if isinstance(v, list) else v}" for k, v in changed.items())])


def report(results: dict[str, Any]) -> str:
    """Markdown report: validity first, then the comparison tables."""
    v, s = results["validity"], results["settings"]
    lines = ["# DAIL in the didactic world", "",
             f"Command: `{command_of(s)}` (this run: {results.get('minutes', '?')} minutes on this machine; "
             "stages found in the output folder's cache were reused). "
             f"Model: `{results['model']}`.", "", "## Validity of the world (base model)", ""]
    known = v.get("known_student_pass@1", {})
    lines += ["| known type | student pass@1 |", "|---|---|"]
    lines += [f"| {k} | {x:.3f} |" for k, x in known.items()]
    lines += ["", "| novel type | student pass@1 | student pass@64 | privileged pass@1 | "
              "privileged copied items | forced didactic-line error | forced own-line error |",
              "|---|---|---|---|---|---|---|"]
    for k, x in v.get("novel", {}).items():
        copied = x.get("privileged_copied_items")  # absent from validity files of older models
        lines.append(f"| {k} | {x['student_pass@1']:.3f} | {x['student_pass@64']:.3f} | "
                     f"{x['privileged_pass@1']:.3f} | {'n/a' if copied is None else f'{copied:.3f}'} | "
                     f"{x['forced_didactic_error_rate']:.3f} | {x['forced_detailed_error_rate']:.3f} |")
    ks = _ks(results)
    lines += ["", f"## Held-out novel problems ({s['n_test']} problems x {s['eval_n']} samples)", "",
              "| method | " + " | ".join(ks) + " | mean tokens | retention (known pass@1) | trainable share |",
              "|---" * (len(ks) + 4) + "|"]
    seeds = s.get("seeds", 1)
    for name, m in results["methods"].items():
        cells = [_figure(m, k, digits=3, seeds=seeds) for k in ks]
        tokens = _figure(m, "mean_tokens", digits=1, seeds=seeds)
        share = m.get("trainable_share")
        share = "n/a" if share is None else f"{100 * share:.2f}%"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {tokens} | {_figure(m, 'retention', digits=3, seeds=seeds)} | "
                     f"{share} |")
    if seeds > 1:
        lines += ["", f"Each trained method: the mean over {seeds} training seeds ({_seed_list(s)}; the same "
                  "traces); brackets: the lowest and the highest seed's figure (the base model is evaluated "
                  "once). A difference inside these ranges is not a difference. The other tables give means."]
    else:
        lines += ["", "Brackets: 95% bootstrap interval over problems (one training seed; `--seeds N` trains "
                  "each method N times and gives the spread)."]
    lines += [f"Trainable share: the adapter's parameters over all the model's (the paper's LoRA, r 32 on the seven "
              f"projections of Qwen2.5-7B, trains 80.7M weights beside 7.6B: 1.05%; `--lora-r 1` gives the world model "
              f"0.68%). Contrastive rows: divergence {s.get('divergence', 'reverse')}, "
              f"gamma {s['gamma']}."]
    first = next(iter(results["methods"].values()))
    if first.get("by_type"):
        cols = [(t, k) for t, row in first["by_type"].items() for k in row]
        lines += ["", "By problem type:", "", "| method | " + " | ".join(f"{t} {k}" for t, k in cols) + " |",
                  "|---" * (len(cols) + 1) + "|"]
        for name, m in results["methods"].items():
            lines.append(f"| {name} | " + " | ".join(f"{m['by_type'][t][k]:.3f}" for t, k in cols) + " |")
    # Training problems get fewer samples than test ones: compare at the largest k both have.
    top = [k for k in ks if k in first["train_pass@k"]][-1]
    lines += ["", f"## Training problems ({s['n_train_eval']} x {s['train_eval_n']} samples) versus test "
              "(the inverse generalization gap)", "",
              f"| method | train pass@1 | test pass@1 | train {top} | test {top} |", "|---|---|---|---|---|"]
    for name, m in results["methods"].items():
        t = m["train_pass@k"]
        lines.append(f"| {name} | {t['pass@1']:.3f} | {m['pass@1']:.3f} | {t[top]:.3f} | {m[top]:.3f} |")
    lines += ["", "## Accuracy under a token budget (test)", ""]
    budgets = list(next(iter(results["methods"].values()))["accuracy_under_budget"])
    lines += ["| method | " + " | ".join(budgets) + " |", "|---" * (len(budgets) + 1) + "|"]
    for name, m in results["methods"].items():
        acc = m["accuracy_under_budget"]
        lines.append(f"| {name} | " + " | ".join(f"{acc[b]:.3f}" if acc[b] is not None else "n/a"
                                                 for b in budgets) + " |")
    lines += ["", "## Rollouts", "", "Kept traces: items copied as the expert's fused line, primitive lines "
              "written in the privileged role's habits, and the base student's mean NLL per token of them "
              "(its own style scores low).", "",
              "| data | tau | mean acceptance | trace accuracy | problems kept | copied items | habit lines | "
              "student NLL/token |", "|---|---|---|---|---|---|---|---|"]
    for source, r in results.get("rollouts", {}).items():
        tau = SOURCES[source][0] if SOURCES[source][0] is not None else s["tau"]
        # habit_lines is absent from the style files of runs made before it was measured.
        cells = [f"{r[k]:.3f}" if r.get(k) is not None else "n/a"
                 for k in ("trace_accuracy", "copied_items", "habit_lines", "student_nll")]
        lines.append(f"| {source} | {tau} | {r['mean_acceptance_rate']:.3f} | {cells[0]} | "
                     f"{r['problems_selected']}/{r['problems']} | {cells[1]} | {cells[2]} | {cells[3]} |")
    if shared := results.get("mixed_vs_direct"):
        lines.append(f"\nMixed and direct traces are the same for {shared['identical']} of the "
                     f"{shared['problems']} problems both kept."
                     + (" They are the same training data, so direct_dail is dail's run (its adapters and "
                        "evaluations, not a second training)." if shared.get("same_training_data") else ""))
    for name, why in results.get("skipped", {}).items():
        lines.append(f"\nNot trained: **{name}** ({why}).")
    lines += ["", "## Settings", "", "```json", json.dumps(s, indent=1), "```", ""]
    return "\n".join(lines)


def _figure(method: dict[str, Any], key: str, *, digits: int, seeds: int) -> str:
    """A figure of the held-out table: with several seeds its mean and [min, max] over them (the
    base model, evaluated once, gets neither), with one its bootstrap interval when it has one."""
    value = method[key]
    if value is None:
        return "n/a"
    text = f"{value:.{digits}f}"
    if seeds > 1:
        spread = (method.get("spread") or {}).get(key)
        shown = max(digits - 1, 1)
        return text + (f" [{spread['min']:.{shown}f}, {spread['max']:.{shown}f}]" if spread else "")
    ci = (method.get("pass@k_ci") or {}).get(key[5:]) if key.startswith("pass@") else None
    return text + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def _seed_list(settings: dict[str, Any]) -> str:
    first = settings["seed"]
    return ", ".join(str(first + i) for i in range(settings.get("seeds", 1)))


def plot(results: dict[str, Any], root: Path) -> None:
    """pass@k curves and accuracy against token budget of every method, as PNG. With several
    training seeds a method's band spans its lowest and highest seed (else the bootstrap
    interval over problems); a method trained on another's data (its adapters) is drawn once."""
    from dail.evaluation.plots import plot_summaries

    seeds = results["settings"].get("seeds", 1)
    drawn: dict[str, Any] = {}
    for name, m in results["methods"].items():
        if m.get("adapters") and any(m["adapters"] == other.get("adapters") for other in drawn.values()):
            continue
        label = f"{name} ({m['divergence']})" if m.get("divergence") else name
        drawn[label] = (m | {"pass@k_ci": seed_range(m)}) if seeds > 1 else m
    bands = f"band: {seeds} seeds' range" if seeds > 1 else "band: 95% bootstrap"
    plot_summaries(drawn, root, title=f"(held-out novel; {bands})")


def seed_range(method: dict[str, Any]) -> dict[str, list[float]]:
    """pass@k's [lowest, highest] over the training seeds, keyed like a bootstrap interval."""
    from dail.evaluation.report import pass_at_k_keys

    spread = method.get("spread") or {}
    return {key[5:]: [spread[key]["min"], spread[key]["max"]] for key in pass_at_k_keys(spread)}
