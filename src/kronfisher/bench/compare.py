"""Run several optimizers on one problem under equal budgets; summarise and plot."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from .io import read_json, write_csv, write_json
from .problems import PROBLEMS
from .runner import RunConfig, train

__all__ = ["compare", "summarise", "plot_runs", "time_to_reach"]


def _signature(cfg: RunConfig) -> str:
    return json.dumps(asdict(cfg), sort_keys=True)


def compare(configs: list[RunConfig], out: str | Path, train_data, test_data, *,
            progress: bool = True, echo=print) -> dict[str, dict]:
    """Run every config (skipping finished ones found in ``out/runs``), then write
    ``summary.md``, ``summary.json`` and the plots. Returns the results by optimizer."""
    out = Path(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    results = {}
    for cfg in configs:
        path = out / "runs" / f"{cfg.optimizer}.json"
        if path.exists():
            try:
                old = read_json(path)
                if old.get("signature") == _signature(cfg):
                    echo(f"[{cfg.optimizer}] finished earlier, kept ({path})")
                    results[cfg.optimizer] = old
                    continue
            except (json.JSONDecodeError, OSError):
                pass  # unreadable: run again
        echo(f"[{cfg.optimizer}] training on {cfg.problem} ...")
        res = train(cfg, train_data, test_data, progress=progress)
        res["signature"] = _signature(cfg)
        # per-step rows go to their own CSV (iteration,wall_time,minibatch_loss_pixel)
        write_csv(out / "runs" / f"{cfg.optimizer}.iterations.csv", res.pop("iterations"))
        write_json(path, res)
        write_csv(out / "runs" / f"{cfg.optimizer}.csv", res["history"])
        f = res["final"]
        echo(f"[{cfg.optimizer}] {res['status']}: epoch {f['epoch']:.2f}, train loss"
             f" {f['train_loss']:.4f} ({f['train_loss_pixel']:.5f}/pixel), test"
             f" {f['test_loss']:.4f}, {f['wall_time']:.1f}s")
        results[cfg.optimizer] = res
    summary = summarise(results)
    write_json(out / "summary.json", summary["rows"])
    from .io import atomic_write_text

    atomic_write_text(out / "summary.md", summary["markdown"]
                      + _iteration_section(results, out, train_data))
    plot_runs(results, out)
    return results


def _iteration_section(results: dict[str, dict], out: Path, train_data) -> str:
    """Per-iteration comparison with the authors' stored runs (from runs/*.iterations.csv)."""
    import csv

    from .problems import constant_loss
    from .reference import iteration_table

    losses = {}
    for name in results:
        path = out / "runs" / f"{name}.iterations.csv"
        if path.exists():
            with open(path) as f:
                losses[name] = [float(r["minibatch_loss_pixel"]) for r in csv.DictReader(f)]
    if not losses:
        return ""
    problem = next(iter(results.values()))["config"]["problem"]
    plateau = constant_loss(train_data, PROBLEMS[problem].likelihood)
    return ("\n## Per iteration, next to the authors' stored runs\n\nPer-pixel minibatch"
            " training loss (before the update), mean over iterations i−10 … i+10.\n\n"
            + iteration_table(problem, losses, plateau))


def time_to_reach(history: list[dict], target: float) -> float | None:
    """Wall time of the first evaluation whose training loss is ≤ target (None if never)."""
    for row in history:
        if row["train_loss"] <= target:
            return row["wall_time"]
    return None


def summarise(results: dict[str, dict], reference: str = "kfac") -> dict:
    """Final losses per optimizer and the time each needs to reach the reference's final loss."""
    ref = results.get(reference)
    target = ref["final"]["train_loss"] if ref else None
    rows = []
    for name, r in results.items():
        f = r["final"]
        reach = time_to_reach(r["history"], target) if target is not None else None
        rows.append({
            "optimizer": name, "status": r["status"], "epochs": f["epoch"], "steps": f["step"],
            "wall_time": f["wall_time"], "train_loss": f["train_loss"],
            "train_loss_pixel": f["train_loss_pixel"], "test_loss": f["test_loss"],
            "test_loss_pixel": f["test_loss_pixel"], "time_to_reference": reach,
        })
    problem = next(iter(results.values()))["config"]["problem"] if results else "?"
    lines = [
        f"# {problem}: optimizer comparison", "",
        f"Reference for 'time to reach': {reference}'s final training loss"
        + (f" ({target:.4f})." if target is not None else " (not run)."), "",
        "| optimizer | status | epochs | wall s | train loss | train /pixel | test loss |"
        " test /pixel | time to reach ref (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        reach = "—" if r["time_to_reference"] is None else f"{r['time_to_reference']:.1f}"
        lines.append(
            f"| {r['optimizer']} | {r['status']} | {r['epochs']:.2f} | {r['wall_time']:.1f} |"
            f" {r['train_loss']:.4f} | {r['train_loss_pixel']:.5f} | {r['test_loss']:.4f} |"
            f" {r['test_loss_pixel']:.5f} | {reach} |"
        )
    lines.append("")
    lines.append("Losses: per-example NLL summed over pixels, and its per-pixel mean"
                 " (the figure the paper reports). Wall time counts training only.")
    return {"rows": rows, "markdown": "\n".join(lines) + "\n"}


def plot_runs(results: dict[str, dict], out: str | Path) -> list[Path]:
    """PNG plots of training (solid) and test (dashed) loss against epochs and wall time."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out = Path(out)
    paths = []
    problem = next(iter(results.values()))["config"]["problem"] if results else ""
    for xkey, xlabel, fname in [("epoch", "epoch", "loss_vs_epoch.png"),
                                ("wall_time", "wall-clock time (s)", "loss_vs_time.png")]:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, (name, r) in enumerate(results.items()):
            h = r["history"]
            color = f"C{i}"
            ax.plot([row[xkey] for row in h], [row["train_loss_pixel"] for row in h],
                    color=color, label=f"{name} (train)")
            ax.plot([row[xkey] for row in h], [row["test_loss_pixel"] for row in h],
                    color=color, ls="--", alpha=0.6)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("per-pixel loss (dashed: test)")
        ax.set_title(f"{problem}: {PROBLEMS[problem].likelihood} auto-encoder" if problem else "")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out / fname
        tmp = out / f".{fname}.tmp.png"
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        tmp.replace(path)
        paths.append(path)
    return paths
