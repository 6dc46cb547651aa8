"""One pilot run of the ``adaptive`` preset with some of its settings overridden.

    PYTHONPATH=src python benchmarks/preset_pilot.py curves lanczos 1000 OUT \
        '{"quad_model": "approx", "jvp_fraction": 0.25}' [--seed 0]

Trains the problem's model like ``kronfisher train --preset adaptive`` with the JSON's
``Hyper`` fields replaced (any field of ``bench.problems.Hyper``), one torch thread, and
writes ``OUT/runs/<optimizer>-<overrides>.iterations.csv`` (``iteration,wall_time,
minibatch_loss_pixel``) and a JSON with the adaptive trace (λ, α, μ, q, ρ per step), the
phase times and the settings. The pilots that chose the preset are in
docs/results/adaptive-pilots-curves/ (docs/results.md, "The adaptive preset").
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from kronfisher.bench.runner import ITERATION_FIELDS, RunConfig, train
from kronfisher.data import load_dataset


class _Overridden(RunConfig):
    """A RunConfig whose resolved settings carry the pilot's overrides."""

    overrides: dict = {}

    def resolved_hyper(self):
        return replace(super().resolved_hyper(), **self.overrides)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("problem")
    ap.add_argument("optimizer")
    ap.add_argument("iterations", type=int)
    ap.add_argument("out", type=Path)
    ap.add_argument("overrides", nargs="?", default="{}")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    over = json.loads(args.overrides)
    _Overridden.overrides = over
    cfg = _Overridden(args.problem, args.optimizer, preset="adaptive",
                      iterations=args.iterations, seed=args.seed, eval_subset=2000)
    t0 = time.time()
    res = train(cfg, load_dataset(args.problem, "train"), load_dataset(args.problem, "test"),
                progress=False)
    name = args.optimizer + "".join(f"-{k}{v}" for k, v in over.items())
    runs = args.out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    with open(runs / f"{name}.iterations.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(ITERATION_FIELDS))
        w.writeheader()
        w.writerows(res["iterations"])
    (runs / f"{name}.json").write_text(json.dumps(
        {"trace": res["adaptive_trace"], "phase": res["phase_seconds"], "hyper": res["hyper"]}))
    last = res["iterations"][-1]
    print(f"{name}: {last['iteration']} iterations in {time.time() - t0:.1f} s, last minibatch"
          f" loss {last['minibatch_loss_pixel']:.4f}/pixel (1 thread)")


if __name__ == "__main__":
    main()
