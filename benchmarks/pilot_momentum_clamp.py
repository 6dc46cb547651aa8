"""A ``preset_pilot.py`` run with the automatic momentum clamped to [LO, HI].

    PYTHONPATH=src python benchmarks/pilot_momentum_clamp.py 0 0.95 curves kpsvd 600 OUT \
        '{"damping": 1.5}'

When the exact quadratic model's joint (α, μ) has μ outside [LO, HI], μ is set to the
nearer bound and α re-solved with μ fixed (the constrained minimiser of the convex 2×2
model lies on that bound). Everything after HI is passed to ``preset_pilot.py``. A pilot
for docs/results.md (issue 15, "After the race"); ``-1e9 1e9`` is the unclamped rule.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import kronfisher.optim.adaptive as adaptive
from kronfisher.optim import quadratic

LO, HI = float(sys.argv[1]), float(sys.argv[2])
_solve = quadratic.solve_model


def _clamped(model, damping, *, momentum=None, **kw):
    sol = _solve(model, damping, momentum=momentum, **kw)
    if sol is None or momentum is not None or model.grad.shape[0] != 2 or sol.fallback:
        return sol
    if LO <= sol.momentum <= HI:
        return sol
    return _solve(model, damping, momentum=min(max(sol.momentum, LO), HI), **kw)


adaptive.solve_model = _clamped  # type: ignore[assignment]
sys.argv = ["preset_pilot.py"] + sys.argv[3:]
runpy.run_path(str(Path(__file__).with_name("preset_pilot.py")), run_name="__main__")
