"""`python -m bench.install_effect PYTHON [PYTHON ...]`: does an environment change the built-in
engine? Each interpreter (a virtual environment's python with dail installed, e.g. one with
vLLM's CPU build and one without) runs the same built-in mixed rollout in a subprocess, rounds
interleaved: SmolLM2-135M-Instruct, 8 CHAMP problems, tau 0.8, temperature 0.6, 48 tokens. Prints
each one's packages, its median seconds over the first's (per round), and whether its traces are
the first's, token for token.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import hashlib, json, time
import torch, transformers
from dail.config import ModelConfig, PromptConfig
from dail.data import load_champ
from dail.models import load
from dail.rollout.mixed import mixed_rollout
from dail.rollout.rule import RolloutSettings, sequence_seed
from dail.stages.generate import prepare_problems

model, tokenizer = load(ModelConfig(model="smollm2"))
prepared, _ = prepare_problems(load_champ()[:8], tokenizer, PromptConfig(), max_prompt_tokens=4096)
student = [p.prompt_ids["student"] for p in prepared]
privileged = [p.prompt_ids["privileged"] for p in prepared]
seeds = [sequence_seed(0, p.problem.id) for p in prepared]
settings = RolloutSettings(tau=0.8, temperature=0.6, top_p=0.95, max_new_tokens=48)
mixed_rollout(model, student[:1], privileged[:1], seeds[:1], settings, pad_id=0)  # warm-up
tic = time.perf_counter()
traces = mixed_rollout(model, student, privileged, seeds, settings, pad_id=0)
seconds = time.perf_counter() - tic
try:
    import vllm
    vllm_version = vllm.__version__
except ImportError:
    vllm_version = None
digest = hashlib.sha256(json.dumps([t.token_ids for t in traces]).encode()).hexdigest()[:16]
print(json.dumps({"seconds": seconds, "traces": digest, "torch": torch.__version__,
                  "transformers": transformers.__version__, "vllm": vllm_version}))
"""


def run_child(python: str) -> dict:
    out = subprocess.run([python, "-c", CHILD], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.install_effect")
    parser.add_argument("pythons", nargs="+", help="interpreters to compare; the first is the reference")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    runs: dict[str, list[dict]] = {p: [] for p in args.pythons}
    for _ in range(args.rounds):
        for python in args.pythons:
            runs[python].append(run_child(python))
    first = args.pythons[0]
    for python in args.pythons:
        ratios = [r["seconds"] / f["seconds"] for r, f in zip(runs[python], runs[first], strict=True)]
        last = runs[python][-1]
        print(json.dumps({"python": python, "transformers": last["transformers"], "vllm": last["vllm"],
                          "seconds_vs_first": round(statistics.median(ratios), 3),
                          "seconds": [round(r["seconds"], 1) for r in runs[python]],
                          "same_traces_as_first": last["traces"] == runs[first][-1]["traces"]}))


if __name__ == "__main__":
    sys.exit(main())
