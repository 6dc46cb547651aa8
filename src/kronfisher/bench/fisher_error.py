"""The Fisher-accuracy study: every approximation against the exact block of one layer.

Along an Adam trajectory, every ``every`` steps, a batch of ``m`` training examples with
targets sampled from the model gives per-example (a, g) for one Linear layer. From the
same (a, g): the exact block F (dense), and every method's approximation F̂. Reported:
relative Frobenius error ‖F − F̂‖_F / ‖F‖_F and relative spectrum error ‖s − ŝ‖₂ / ‖s‖₂
(eigenvalues sorted in decreasing order), plus a check of the orderings that hold for
exact solvers (DESIGN.md §3).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from ..curvature import METHODS, approximate
from ..layers import adapter_for
from ..linalg import exact_fisher_block
from ..losses import sampled_nll
from .io import write_csv
from .problems import PROBLEMS, build_model, per_example_loss

__all__ = ["capture_layer_stats", "fisher_errors", "fisher_error_study", "plot_fisher_errors"]


def capture_layer_stats(model: nn.Module, module: nn.Module, x: Tensor, likelihood: str
                        ) -> tuple[Tensor, Tensor]:
    """Per-example (a, g) of ``module`` for a sampled-target NLL (true Fisher)."""
    adapter = adapter_for(module)
    box: dict = {}

    def fwd(mod, inputs, output):
        box["a"] = adapter.inputs(inputs[0])
        output.register_hook(lambda grad: box.__setitem__("g", adapter.output_grads(grad)))

    handle = module.register_forward_hook(fwd)
    try:
        model.zero_grad(set_to_none=True)
        sampled_nll(model(x), likelihood).backward()  # mean over examples
    finally:
        handle.remove()
    model.zero_grad(set_to_none=True)
    return box["a"][:, 0, :], box["g"][:, 0, :] * len(x)


def fisher_errors(a: Tensor, g: Tensor, methods=METHODS) -> dict[str, dict[str, float]]:
    """Relative Frobenius and spectrum errors of each method against the exact block."""
    a, g = a.double(), g.double()
    F = exact_fisher_block(a, g)
    s = torch.linalg.eigvalsh(F).flip(0)
    fn, sn = F.norm(), s.norm()
    out = {}
    for method in methods:
        Fh = approximate(a, g, method).to_dense()
        sh = torch.linalg.eigvalsh(0.5 * (Fh + Fh.mT)).flip(0)
        out[method] = {"frobenius": float((F - Fh).norm() / fn),
                       "spectrum": float((s - sh).norm() / sn)}
    return out


def ordering_violations(errs: dict[str, dict[str, float]], slack: float = 1e-9) -> list[str]:
    """Orderings that must hold for exact solvers: rank-2 ≤ KPSVD ≤ KFAC, corrected ≤ KFAC."""
    e = {k: v["frobenius"] for k, v in errs.items()}
    bad = []
    for lo, hi in [("deflation", "kpsvd"), ("lanczos", "kpsvd"), ("kpsvd", "kfac"),
                   ("kfac_corrected", "kfac")]:
        if lo in e and hi in e and e[lo] > e[hi] * (1 + slack):
            bad.append(f"{lo} > {hi}")
    return bad


def fisher_error_study(problem: str, layer: int, steps: int, every: int, train_data: Tensor, *,
                       m: int | None = None, lr: float = 1e-3, seed: int = 0,
                       preset: str = "paper", max_dim: int = 8000, log=None,
                       sub_block: tuple[int, int] | None = None,
                       on_rows: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Run Adam for ``steps`` steps; measure every ``every`` steps (and at step 0).

    ``layer`` counts Linear layers from 1. ``sub_block=(k_out, k_in)`` restricts the study
    to the weights of the first k_out output units from the first k_in inputs, plus their
    biases: that block of the Fisher is the one built from (a[:, :k_in], 1) and g[:, :k_out],
    so every method is compared on it exactly as on a whole layer. ``on_rows`` is called
    with all rows so far after each measurement (to write them as they are computed).
    Returns one row per (step, method).
    """
    p = PROBLEMS[problem]
    torch.manual_seed(seed)
    model = build_model(problem, preset, seed=seed)
    linears = [mod for mod in model if isinstance(mod, nn.Linear)]
    if not 1 <= layer <= len(linears):
        raise ValueError(f"--layer must be in 1..{len(linears)} for {problem}, got {layer}")
    mod = linears[layer - 1]
    k_out, k_in = sub_block or (mod.out_features, mod.in_features)
    if not (1 <= k_out <= mod.out_features and 1 <= k_in <= mod.in_features):
        raise ValueError(f"sub-block ({k_out}, {k_in}) must fit layer {layer}'s"
                         f" ({mod.out_features} outputs, {mod.in_features} inputs)")
    dim = (k_in + 1) * k_out
    if dim > max_dim:
        raise ValueError(
            f"layer {layer} of {problem} has {dim} parameters: the dense Fisher would be"
            f" {dim}×{dim}; pick a smaller layer, a --sub-block or raise --max-dim"
        )
    m = m or p.batch_size
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed + 1)
    rows: list[dict] = []
    for step in range(steps + 1):
        idx = torch.randint(len(train_data), (p.batch_size,), generator=gen)
        x = train_data[idx]
        if step % every == 0:
            a, g = capture_layer_stats(model, mod, x[:m], p.likelihood)
            if sub_block:
                a, g = torch.cat([a[:, :k_in], a[:, -1:]], 1), g[:, :k_out]
            errs = fisher_errors(a, g)
            bad = ordering_violations(errs)
            for method, e in errs.items():
                rows.append({"step": step, "method": method, "frobenius_error": e["frobenius"],
                             "spectrum_error": e["spectrum"], "violations": ";".join(bad)})
            if log:
                log(step, errs, bad)
            if on_rows:
                on_rows(rows)
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        per_example_loss(model(x), x, p.likelihood).mean().backward()
        opt.step()
    return rows


def plot_fisher_errors(rows: list[dict], path: str | Path, title: str = "") -> Path | None:
    """PNG of each method's relative error along the trajectory; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    path = Path(path)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for key, ax, label in [("frobenius_error", axes[0], "relative Frobenius error"),
                           ("spectrum_error", axes[1], "relative spectrum error")]:
        for i, method in enumerate(methods):
            rs = [r for r in rows if r["method"] == method]
            ax.plot([r["step"] for r in rs], [r[key] for r in rs], marker="o", ms=3,
                    color=f"C{i}", label=method)
        ax.set_xlabel("Adam step")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_rows(rows: list[dict], path: str | Path) -> None:
    write_csv(path, rows)
