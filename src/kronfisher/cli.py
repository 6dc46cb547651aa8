"""Command-line tool: ``kronfisher train | compare | fisher-error | demo | data``."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from .cli_args import build_parser

__all__ = ["main", "build_parser"]


def _load(problem: str):
    from .data import DatasetError, load_dataset

    try:
        return load_dataset(problem, "train"), load_dataset(problem, "test")
    except DatasetError as e:
        print(f"kronfisher: cannot load {problem}: {e}", file=sys.stderr)
        raise SystemExit(2) from e


def _config(args, optimizer: str, lr: float | None = None, label: str | None = None):
    from .bench.runner import RunConfig

    return RunConfig(
        problem=args.problem, optimizer=optimizer, preset=args.preset, seed=args.seed,
        epochs=args.epochs, time_budget=args.time_budget, lr=args.lr if lr is None else lr,
        damping=args.damping, label=label,
        batch_size=args.batch_size, cov_update_freq=args.cov_update_freq,
        inv_update_freq=args.inv_update_freq, solver=args.solver,
        train_subset=args.train_subset, eval_subset=args.eval_subset,
        iterations=args.iterations, reseed_layers=args.reseed_layers, device=args.device,
        damping_scheme=args.damping_scheme, factor_balance=args.factor_balance,
        weight_decay=args.weight_decay, ema_counter=args.ema_counter,
    )


def _cmd_train(args) -> int:
    from .bench.io import (
        OutputError,
        check_writable_dir,
        csv_text,
        move_aside,
        save_json,
        save_text,
    )
    from .bench.runner import train

    if args.epochs is None and args.time_budget is None and args.iterations is None:
        args.epochs = 1.0
    cfg = _config(args, args.optimizer)
    from .distributed.training import launched_by_torchrun

    if launched_by_torchrun():
        return _cmd_train_data_parallel(args, cfg)
    if args.out:
        try:  # before the training, not after it
            check_writable_dir(args.out)
        except OutputError as e:
            print(f"kronfisher train: {e}", file=sys.stderr)
            return 2
    tr, te = _load(args.problem)
    args.on_interrupt = ("training stopped; train writes its result only at the end, so"
                         " nothing was kept: rerun the command to train again")

    def log(row):
        print(f"epoch {row['epoch']:7.2f}  train {row['train_loss']:.4f}"
              f" ({row['train_loss_pixel']:.5f}/px)  test {row['test_loss']:.4f}"
              f"  {row['wall_time']:.1f}s", flush=True)

    res = train(cfg, tr, te, progress=not args.no_progress, log=log)
    print(f"{args.optimizer} on {args.problem}: {res['status']}")
    iterations = res.pop("iterations", None)  # None: a record from elsewhere (tests)
    if args.out:
        from . import __version__

        res["kronfisher_version"] = __version__
        names = ("run.json", "run.csv") + (("iterations.csv",) if iterations is not None else ())
        for name in names:  # an earlier run's files are kept, renamed
            if (args.out / name).exists():
                print(f"kept the earlier {name} as {move_aside(args.out / name, 'old').name}")
        wrote = [save_json(args.out / "run.json", res),
                 save_text(args.out / "run.csv", csv_text(res["history"]))]
        if iterations is not None:
            wrote.append(save_text(args.out / "iterations.csv", csv_text(iterations)))
        if wrote != [args.out / name for name in names]:
            print(f"kronfisher train: could not write the run to {args.out}; kept as said"
                  " above", file=sys.stderr)
            return 1
        print(f"wrote {args.out / 'run.json'}, " + " and ".join(names[1:]))
    return 0 if res["status"] == "complete" else 1


def _cmd_train_data_parallel(args, cfg) -> int:
    """``train`` under torchrun: every rank trains its shard; rank 0 logs and writes once."""
    import torch.distributed as dist

    from .bench.io import save_json
    from .distributed.training import init_from_env, train_data_parallel

    init_from_env(args.device)
    rank = dist.get_rank()
    if args.out and rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
    tr, te = _load(args.problem)

    def log(row):
        print(f"epoch {row['epoch']:7.2f}  train {row['train_loss']:.4f}"
              f"  test {row['test_loss']:.4f}  {row['wall_time']:.1f}s", flush=True)

    res = train_data_parallel(cfg, tr, te, checkpoint=args.checkpoint,
                              checkpoint_every=args.checkpoint_every, log=log)
    if res is None:  # not rank 0: nothing to print or write
        return 0
    print(f"{args.optimizer} on {args.problem}, {res['world_size']} processes: {res['status']}")
    if args.out:
        print(f"wrote {save_json(args.out / 'run.json', res)}")
    return 0 if res["status"] == "complete" else 1


def _cmd_compare(args) -> int:
    from .bench.compare import compare, summarise
    from .bench.io import OutputError, check_writable_dir
    from .bench.lock import FolderLockedError
    from .bench.problems import ALL_OPTIMIZERS

    names = [s.strip() for s in args.optimizers.split(",") if s.strip()]
    parsed = [_optimizer_with_lr(n) for n in names]
    bad = [n for n, p in zip(names, parsed) if p is None or p[0] not in ALL_OPTIMIZERS]
    if bad or not names:
        print(f"kronfisher compare: unknown optimizer(s) {bad}; choose from {ALL_OPTIMIZERS},"
              " optionally with @LR (e.g. adam@3e-3: that lr, its own row)", file=sys.stderr)
        return 2
    if len(set(names)) != len(names):
        print("kronfisher compare: an optimizer is listed twice", file=sys.stderr)
        return 2
    if args.epochs is None and args.time_budget is None and args.iterations is None:
        print("kronfisher compare: give --epochs, --time-budget or --iterations",
              file=sys.stderr)
        return 2
    configs = [_config(args, p[0], p[1], name if p[1] is not None else None)
               for name, p in zip(names, parsed) if p is not None]
    try:
        check_writable_dir(args.out)
    except OutputError as e:
        print(f"kronfisher compare: {e}", file=sys.stderr)
        return 2
    tr, te = _load(args.problem)
    args.on_interrupt = _compare_interrupted(args.out)
    try:
        results = compare(configs, args.out, tr, te, progress=not args.no_progress)
    except FolderLockedError as e:
        print(f"kronfisher compare: {e}", file=sys.stderr)
        return 2
    except OutputError as e:
        print(f"kronfisher compare: {e}", file=sys.stderr)
        return 1
    print(summarise(results)["markdown"])  # compare said where the plots are, or why none
    return 0


def _optimizer_with_lr(name: str) -> tuple[str, float | None] | None:
    """``"adam@3e-3"`` → ("adam", 0.003); ``"kfac"`` → ("kfac", None); None if malformed."""
    opt, at, lr = name.partition("@")
    if not at:
        return opt, None
    try:
        value = float(lr)
    except ValueError:
        return None
    return (opt, value) if value > 0 and math.isfinite(value) else None


def _compare_interrupted(out: Path):
    def note() -> str:
        from .bench.compare import load_result

        kept = sorted(p.stem for p in (out / "runs").glob("*.json")
                      if load_result(p).record is not None)
        return (f"finished runs kept in {out / 'runs'}: {', '.join(kept) or 'none'}; the run"
                " in progress is lost. Rerun the same command to resume (finished runs are"
                " reused)")
    return note


def _cmd_fisher_error(args) -> int:
    from .bench.fisher_error import fisher_error_study, plot_fisher_errors
    from .bench.io import OutputError, check_writable_dir, csv_text, save_text, write_csv

    try:  # before the study, not after it
        check_writable_dir(args.out)
    except OutputError as e:
        print(f"kronfisher fisher-error: {e}", file=sys.stderr)
        return 2
    csv_path = args.out / "fisher_error.csv"
    tr, _ = _load(args.problem)
    done: list[dict] = []
    failed: list[str] = []

    def log(step, errs, bad):
        cells = "  ".join(f"{k} {v['frobenius']:.4f}" for k, v in errs.items())
        print(f"step {step:5d}  {cells}" + (f"  VIOLATION {bad}" if bad else ""), flush=True)

    def on_rows(rows):  # every row is on disk as soon as it is computed
        done[:] = rows
        try:
            write_csv(csv_path, rows)
        except OSError as e:
            if not failed:
                print(f"kronfisher fisher-error: cannot write {csv_path} ({e.strerror or e});"
                      " the rows are kept in memory and saved elsewhere at the end",
                      file=sys.stderr)
            failed.append(str(e))

    args.on_interrupt = lambda: (f"the {len({r['step'] for r in done})} measurement(s) made"
                                 f" are in {csv_path}" if done and not failed
                                 else "no measurement was written")
    try:
        rows = fisher_error_study(args.problem, args.layer, args.steps, args.every, tr,
                                  m=args.batch, lr=args.lr, seed=args.seed,
                                  preset=args.preset, max_dim=args.max_dim, log=log,
                                  sub_block=args.sub_block, on_rows=on_rows)
    except ValueError as e:
        print(f"kronfisher fisher-error: {e}", file=sys.stderr)
        return 2
    if failed and save_text(csv_path, csv_text(rows)) != csv_path:
        return 1  # save_text said where the rows went
    png = plot_fisher_errors(rows, args.out / "fisher_error.png",
                             f"{args.problem}, Linear layer {args.layer}")
    print(f"wrote {csv_path}" + (f" and {png}" if png else
                                 " (no plot: plots need matplotlib, pip install"
                                 " 'kronfisher[bench]')"))
    violations = [r for r in rows if r["violations"]]
    return 1 if violations else 0


def _cmd_demo(args) -> int:
    from .bench.problems import demo_optimizers

    preset = getattr(args, "preset", "adaptive")
    names = demo_optimizers(preset)
    what = ("adaptive preset: the objective's own Fisher, Levenberg-Marquardt damping, step"
            " from the quadratic model" if preset == "adaptive"
            else "paper preset: the authors' protocol")
    print(f"kronfisher demo: {', '.join(names)} on CURVES ({what};"
          f" {names[-1]}: Adam at the lr our pilot grid picked),"
          f" {args.time_budget:g} s of training each (about"
          f" {len(names) * args.time_budget / 60:.0f} min plus evaluation); results in",
          args.out, flush=True)
    t0 = time.time()
    argv = ["compare", "--problem", "curves", "--preset", preset,
            "--optimizers", ",".join(names),
            "--time-budget", str(args.time_budget), "--out", str(args.out)]
    if args.no_progress:
        argv.append("--no-progress")
    rc = main(argv)
    if rc == 130:  # interrupted: compare said what was kept
        return rc
    if rc == 0:
        print(_demo_versus_authors(args.out, names))
    print(f"demo finished in {time.time() - t0:.0f} s")
    return rc


def _demo_versus_authors(out: Path, names) -> str:
    """Our last ±10-iteration mean minibatch loss next to the authors' at that iteration."""
    import csv

    from .bench.problems import SECOND_ORDER
    from .bench.reference import authors_at, window_mean

    finals: dict[str, float] = {}
    lines = ["Per-pixel minibatch training loss at our last iteration (mean over ±10"
             " iterations) next to the authors' stored run at the same iteration:",
             f"{'optimizer':16s} {'iterations':>10s} {'ours':>8s} {'authors':>8s}"
             f" {'ratio':>6s} {'authors s':>9s}"]
    for name in names:
        path = out / "runs" / f"{name}.iterations.csv"
        if not path.exists():
            continue
        with open(path) as f:
            losses = [float(r["minibatch_loss_pixel"]) for r in csv.DictReader(f)]
        it = len(losses)
        ours = window_mean(losses, it)
        if ours is not None:
            finals[name] = ours
        ref = authors_at("curves", name, it)
        if ours is None or ref is None:
            lines.append(f"{name:16s} {it:10d} {ours or float('nan'):8.4f} {'—':>8s}")
            continue
        lines.append(f"{name:16s} {it:10d} {ours:8.4f} {ref.loss_pixel:8.4f}"
                     f" {ours / ref.loss_pixel:6.2f} {ref.wall_time:9.1f}")
    lines.append("(authors s: their wall time to that iteration, on their GPU)")
    if finals:
        second = {k: v for k, v in finals.items() if k in SECOND_ORDER}
        first = {k: v for k, v in finals.items() if k not in SECOND_ORDER}
        if second and first:
            bs = min(second, key=lambda k: second[k])
            bf = min(first, key=lambda k: first[k])
            ahead = second[bs] < first[bf]
            lines.append(f"Same training time for every optimizer: best natural-gradient"
                         f" method {bs} {second[bs]:.4f}, best first-order {bf}"
                         f" {first[bf]:.4f} — natural gradient "
                         + ("ahead." if ahead else "NOT ahead in this budget."))
    return "\n".join(lines)


def _cmd_curvature_scale(args) -> int:
    from .bench.curvature_scale import curvature_scale_report
    from .bench.runner import RunConfig

    cfg = RunConfig(problem=args.problem, optimizer=args.optimizer, preset=args.preset,
                    seed=args.seed, iterations=max(args.steps, 1), batch_size=args.batch)
    tr, te = _load(args.problem)
    try:
        report = curvature_scale_report(cfg, tr, te, steps=args.steps, n_vectors=args.vectors,
                                        fresh=args.fresh)
    except ValueError as e:
        print(f"kronfisher curvature-scale: {e}", file=sys.stderr)
        return 2
    print(report.text())
    return 0


def _cmd_data(args) -> int:
    from .data import DatasetError, check_cache, load_dataset, splits

    try:
        shapes = {split: tuple(load_dataset(args.name, split).shape) for split in splits(args.name)}
        checks = check_cache(args.name)  # re-hashes the cache; NaN/Inf/out of range raise
    except DatasetError as e:
        print(f"kronfisher data: {e}", file=sys.stderr)
        return 2
    for split, check in checks.items():
        state = ("checksum verified" if check.ok else
                 f"UNVERIFIED: sha256 {check.sha256} is not the pinned {check.pinned}")
        print(f"{args.name} {split}: {shapes[split]} ({state})")
    if not all(c.ok for c in checks.values()):
        print("kronfisher data: the data above does not match its pins (accepted only because"
              " KRONFISHER_DATA_UNPINNED is set); results computed on it are not comparable.",
              file=sys.stderr)
        return 1
    return 0


def _default_threads() -> int:
    """Physical cores this process may run on (hyper-threads of one core count once)."""
    import os

    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not cpus:
        return max(1, os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(),
                       (topo / "core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))  # topology unknown: count the logical CPU
    return max(1, len(cores))


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status (130 after Ctrl-C, with what was kept)."""
    import os

    args = build_parser().parse_args(argv)
    # --threads, else $OMP_NUM_THREADS, else one thread per available physical core: more
    # threads than cores
    # (e.g. torch's default next to another busy process) makes LAPACK's eigh ~100x slower.
    # The env defaults reach libraries loaded later and child processes; set_num_threads sets
    # torch's OpenMP and MKL pools, which were already loaded with `import kronfisher`.
    threads = getattr(args, "threads", None)
    if threads is None:
        env = os.environ.get("OMP_NUM_THREADS", "")
        threads = int(env) if env.isdigit() and int(env) > 0 else _default_threads()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(threads))
    import torch

    torch.set_num_threads(threads)
    handler = {"train": _cmd_train, "compare": _cmd_compare, "fisher-error": _cmd_fisher_error,
               "demo": _cmd_demo, "data": _cmd_data,
               "curvature-scale": _cmd_curvature_scale}[args.command]
    args.on_interrupt = None  # what to tell the user on Ctrl-C; set by the command
    try:
        return handler(args)
    except KeyboardInterrupt:
        note = args.on_interrupt
        note = note() if callable(note) else note
        print(f"\nkronfisher {args.command}: interrupted"
              + (f"; {note}" if note else "; nothing was written"), file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
