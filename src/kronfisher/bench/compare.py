"""Run several optimizers on one problem under equal budgets; summarise and plot.

Resuming: a run whose ``runs/<optimizer>.json`` is a valid result of the same settings,
package version and torch thread count is kept; any other file there (corrupt, empty,
truncated, not UTF-8, a folder, other settings/version/threads) is moved aside to
``<name>.json.<reason>-<time>`` with a message and the run is redone. One ``compare`` at a
time per folder (:func:`~kronfisher.bench.lock.folder_lock`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .io import OutputError, check_writable_dir, csv_text, move_aside, save_json, save_text
from .lock import folder_lock
from .problems import PROBLEMS
from .runner import RunConfig, train

__all__ = ["compare", "summarise", "plot_runs", "time_to_reach", "load_result", "LoadedResult"]

_FINAL_KEYS = ("epoch", "step", "wall_time", "train_loss", "train_loss_pixel", "test_loss",
               "test_loss_pixel")


def _signature(cfg: RunConfig) -> str:
    return json.dumps(asdict(cfg), sort_keys=True)


def _version() -> str:
    from .. import __version__

    return __version__


def _problem_with(obj) -> str | None:
    """Why ``obj`` is not a usable run record (None if it is)."""
    if not isinstance(obj, dict):
        kind = {type(None): "null", list: "array", str: "string", bool: "boolean"}.get(
            type(obj), "number")
        return f"it holds a JSON {kind}, not a run record (an object)"
    for key, typ in (("final", dict), ("history", list), ("status", str), ("config", dict)):
        if not isinstance(obj.get(key), typ):
            return f"its {key!r} entry is missing or not a {typ.__name__}"
    missing = [k for k in _FINAL_KEYS if not isinstance(obj["final"].get(k), int | float)]
    if missing:
        return f"its 'final' entry lacks {missing}"
    if not obj["history"] or not all(isinstance(r, dict) for r in obj["history"]):
        return "its 'history' is empty or malformed"
    return None


@dataclass(frozen=True)
class LoadedResult:
    """What :func:`load_result` found in a run-record file.

    Attributes:
        record: the run record, None if the file is not a usable one.
        why: why it is not usable (None when ``record`` is set).
    """

    record: dict | None
    why: str | None = None


def load_result(path: Path) -> LoadedResult:
    """The valid run record at ``path``, or why there is none (the file is left as it is)."""
    if path.is_dir():
        return LoadedResult(None, "it is a folder")
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        return LoadedResult(None, "it is not UTF-8 text")
    except ValueError as e:
        return LoadedResult(None, f"it is not valid JSON ({e})")
    except OSError as e:
        return LoadedResult(None, f"it cannot be read ({e.strerror or e})")
    why = _problem_with(obj)
    return LoadedResult(None, why) if why else LoadedResult(obj)


def _reusable(cfg: RunConfig, path: Path, echo) -> dict | None:
    """The finished run at ``path`` if it can stand for ``cfg`` now.

    Otherwise the file is moved aside (saying why) and None is returned.
    """
    if not path.exists() and not path.is_symlink():
        return None
    name = f"[{cfg.name}]"
    loaded = load_result(path)
    old = loaded.record
    if old is None:
        aside = move_aside(path, "corrupt")
        echo(f"{name} {path} is not a usable result ({loaded.why}): moved it to {aside.name},"
             " running again")
        return None
    threads, version = torch.get_num_threads(), _version()
    differs = []
    if old.get("signature") != _signature(cfg):
        differs.append("other settings")
    if old.get("kronfisher_version") != version:
        differs.append(f"kronfisher {old.get('kronfisher_version', 'unknown')} (now {version})")
    if old.get("torch_threads") != threads:
        differs.append(f"{old.get('torch_threads', 'unknown')} torch threads (now {threads})")
    if differs:
        aside = move_aside(path, "old")
        echo(f"{name} the finished run in {path} was made with {', '.join(differs)}; its"
             f" times would not compare: moved it to {aside.name}, running again")
        return None
    echo(f"{name} finished earlier, kept ({path})")
    return old


def compare(configs: list[RunConfig], out: str | Path, train_data, test_data, *,
            progress: bool = True, echo=print) -> dict[str, dict]:
    """Run every config, then write ``summary.md``, ``summary.json`` and the plots.

    Finished runs found in ``out/runs`` are kept. Returns the results by optimizer.

    Raises:
        OutputError: ``out`` cannot be written (checked before any training), or some
            file could not be written at the end (each was saved to a rescue folder, named
            in the message, so no result is lost).
        FolderLockedError: another live process is running a compare on ``out``.
    """
    out = Path(out)
    check_writable_dir(out)
    with folder_lock(out, what="kronfisher compare", echo=echo):
        return _compare_locked(configs, out, train_data, test_data, progress, echo)


def _compare_locked(configs, out: Path, train_data, test_data, progress, echo):
    check_writable_dir(out / "runs")
    results, rescued = {}, []

    def save(path: Path, text: str) -> None:
        where = save_text(path, text, echo=echo)
        if where != path:
            rescued.append(f"{path.name} → {where or 'stdout'}")

    for cfg in configs:
        path = out / "runs" / f"{cfg.name}.json"
        old = _reusable(cfg, path, echo)
        if old is not None:
            results[cfg.name] = old
            continue
        echo(f"[{cfg.name}] training on {cfg.problem} ...")
        res = train(cfg, train_data, test_data, progress=progress)
        res["signature"] = _signature(cfg)
        res["kronfisher_version"] = _version()
        # per-step rows go to their own CSV (iteration,wall_time,minibatch_loss_pixel)
        iterations = res.pop("iterations", None)  # None: a record from elsewhere (tests)
        if iterations is not None:
            save(out / "runs" / f"{cfg.name}.iterations.csv", csv_text(iterations))
        save(path, json.dumps(res, indent=1, sort_keys=True) + "\n")
        save(out / "runs" / f"{cfg.name}.csv", csv_text(res["history"]))
        f = res["final"]
        echo(f"[{cfg.name}] {res['status']}: epoch {f['epoch']:.2f}, train loss"
             f" {f['train_loss']:.4f} ({f['train_loss_pixel']:.5f}/pixel), test"
             f" {f['test_loss']:.4f}, {f['wall_time']:.1f}s")
        results[cfg.name] = res
    summary = summarise(results)
    if save_json(out / "summary.json", summary["rows"], echo=echo) != out / "summary.json":
        rescued.append("summary.json")
    save(out / "summary.md", summary["markdown"] + _iteration_section(results, out, train_data))
    try:
        plots = plot_runs(results, out)
        echo(f"plots: {', '.join(str(p) for p in plots)}" if plots else
             "no plots: they need matplotlib (pip install 'kronfisher[bench]')")
    except OSError as e:
        echo(f"kronfisher: could not write the plots in {out}: {e.strerror or e}")
    if rescued:
        raise OutputError(f"could not write every file in {out}; kept elsewhere:"
                          f" {'; '.join(rescued)}")
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
        reach_text = ("—" if r["time_to_reference"] is None
                      else f"{r['time_to_reference']:.1f}")
        lines.append(
            f"| {r['optimizer']} | {r['status']} | {r['epochs']:.2f} | {r['wall_time']:.1f} |"
            f" {r['train_loss']:.4f} | {r['train_loss_pixel']:.5f} | {r['test_loss']:.4f} |"
            f" {r['test_loss_pixel']:.5f} | {reach_text} |"
        )
    lines.append("")
    lines.append("Losses: per-example NLL summed over pixels, and its per-pixel mean"
                 " (the figure the paper reports). Wall time counts training only.")
    return {"rows": rows, "markdown": "\n".join(lines) + "\n"}


def plot_runs(results: dict[str, dict], out: str | Path) -> list[Path]:
    """PNG plots of training (solid) and test (dashed) loss against epochs and wall time.

    Returns the paths written: none without matplotlib (``kronfisher[bench]``).
    """
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
