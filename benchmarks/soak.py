"""Soak test (issue 17): the MNIST auto-encoder trained for many steps with faults injected.

Not part of ``make test`` (minutes, not seconds). A KFAC run of the MNIST deep auto-encoder
(784-1000-500-250-30 and its mirror) where, at random steps drawn from ``--seed``:

* a minibatch holds a NaN pixel (the step must be skipped, nothing reaches the weights);
* the curvature batch is scaled by 1e20 (its factors overflow float32: the update is skipped
  for the layers concerned, the running average kept);
* every ``--ckpt-every`` steps the whole model is saved with ``torch.save(model, path)`` (a
  common habit) and the full training state (model, optimizer, preconditioner state_dicts,
  sampling generator) with ``torch.save``, both through tmp file + ``os.replace``;
* a save onto an existing checkpoint fails half-way (an unpicklable object): the earlier
  file must stay intact and loadable;
* the process is "killed": every object is dropped, new ones are built and the last state
  checkpoint loaded; the replayed steps must be bit-identical to the ones the killed run
  had taken (a fingerprint of all parameters after every step).

At the end: no NaN parameter, every checkpoint loadable (whole-model files with
``weights_only=False`` and carrying no preconditioner, state files with
``weights_only=True``), every replay identical; with ``--reference`` also an uninterrupted
run, whose final parameters must equal the resumed run's bit for bit. Data: the cached
MNIST (``kronfisher data mnist``); without it, generated CURVES (same input size), said so.

    python benchmarks/soak.py --threads 1                  # 2,000 steps
    python benchmarks/soak.py --threads 1 --steps 300      # a shorter soak
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

import kronfisher as kf
import kronfisher.data as kdata
from kronfisher.bench.problems import build_model, per_example_loss


def safe_save(obj, path: Path) -> None:
    """torch.save to a temporary beside ``path``, then os.replace: a failure keeps the old file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@dataclass
class Run:
    """One training process: what a kill loses."""

    model: torch.nn.Module
    opt: torch.optim.Optimizer
    pc: kf.KFAC
    gen: torch.Generator  # samples the curvature batch's targets
    step: int = 0


def new_run(args) -> Run:
    model = build_model("mnist", "paper", seed=args.seed)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    pc = kf.KFAC(model, damping=args.damping, damping_scheme="factored",
                 cov_update_freq=args.freq, inv_update_freq=args.freq, kl_clip=1e-2, lr=args.lr)
    return Run(model, opt, pc, torch.Generator().manual_seed(args.seed + 7))


def training_state(run: Run) -> dict:
    return {"step": run.step, "model": run.model.state_dict(), "opt": run.opt.state_dict(),
            "pc": run.pc.state_dict(), "gen": run.gen.get_state()}


def restore(run: Run, state: dict) -> None:
    run.model.load_state_dict(state["model"])
    run.opt.load_state_dict(state["opt"])
    run.pc.load_state_dict(state["pc"])
    run.gen.set_state(state["gen"])
    run.step = state["step"]


def fingerprint(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class Faults:
    nan: set[int]
    overflow: set[int]
    kills: list[int]
    failed_saves: set[int]

    @classmethod
    def draw(cls, args) -> Faults:
        r = random.Random(args.seed)
        steps = range(1, args.steps)
        ckpts = [s for s in steps if s % args.ckpt_every == 0][1:]  # an earlier file exists
        return cls(nan={s for s in steps if r.random() < args.nan_rate},
                   overflow={s for s in range(0, args.steps, args.freq)  # curvature steps
                             if r.random() < args.overflow_rate},
                   kills=sorted(r.sample(range(args.ckpt_every + 1, args.steps),
                                         min(args.kills, max(0, len(steps) - args.ckpt_every)))),
                   failed_saves=set(r.sample(ckpts, min(args.failed_saves, len(ckpts)))))


class Batches:
    """Minibatch of step s: a fixed permutation per epoch (stateless, so resumable)."""

    def __init__(self, data: torch.Tensor, batch: int, seed: int):
        self.data, self.batch, self.seed = data, batch, seed
        self.per_epoch = len(data) // batch
        self._perm: dict[int, torch.Tensor] = {}

    def __call__(self, step: int) -> torch.Tensor:
        epoch, b = divmod(step, self.per_epoch)
        if epoch not in self._perm:
            self._perm = {epoch: torch.randperm(
                len(self.data), generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))}
        return self.data[self._perm[epoch][b * self.batch:(b + 1) * self.batch]]


def one_step(run: Run, x: torch.Tensor, faults: Faults, n_curv: int, stats: Counter,
             losses: dict[int, float]) -> None:
    s = run.step
    if run.pc.steps % run.pc.cov_update_freq == 0:
        xc = x[:n_curv] * (1e20 if s in faults.overflow else 1.0)
        run.opt.zero_grad(set_to_none=True)
        with run.pc.collect():
            kf.sampled_nll(run.model(xc), "bernoulli", generator=run.gen).backward()
    if s in faults.nan:
        x = x.clone()
        x[-1, 100] = float("nan")  # one corrupt pixel outside the curvature batch
    run.opt.zero_grad(set_to_none=True)
    loss = per_example_loss(run.model(x), x, "bernoulli").mean()
    loss.backward()
    if s not in faults.nan:
        losses[s] = loss.item() / 784  # per pixel (a replayed step overwrites its value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = run.pc.step()
    for w in caught:
        msg = str(w.message)
        stats["warning: " + ("non-finite gradient" if "non-finite gradient" in msg else
                             "curvature overflow" if "not finite" in msg else msg[:60])] += 1
    if ok:
        run.opt.step()
    else:
        stats["skipped steps"] += 1
    run.step += 1


def train(args, data, faults: Faults | None, folder: Path | None, stats: Counter,
          losses: dict[int, float]) -> Run:
    """The run; with ``faults`` None an uninterrupted one without kills or saves."""
    run = new_run(args)
    batches = Batches(data, args.batch, args.seed)
    n_curv = max(1, args.batch // 4)
    none = Faults(set(), set(), [], set())
    f = faults or none
    prints: dict[int, str] = {}
    kills = list(f.kills)
    last_state: Path | None = None
    while run.step < args.steps:
        one_step(run, batches(run.step), f, n_curv, stats, losses)
        s = run.step
        fp = fingerprint(run.model)
        if s in prints:  # a replay after a kill
            stats["replayed steps"] += 1
            if prints[s] != fp:
                stats["replay MISMATCH"] += 1
        prints[s] = fp
        if folder is not None and s % args.ckpt_every == 0:
            whole, state = folder / f"model-{s:05d}.pt", folder / f"state-{s:05d}.pt"
            if s in f.failed_saves and last_state is not None:
                before = last_state.read_bytes()
                try:
                    safe_save({"state": training_state(run), "bad": lambda: 0}, last_state)
                    stats["failed save DID NOT FAIL"] += 1
                except Exception:
                    stats["failed saves (earlier file kept)"] += 1
                if last_state.read_bytes() != before:
                    stats["failed save DAMAGED the earlier file"] += 1
            safe_save(run.model, whole)  # the whole module, as `torch.save(model)` users do
            safe_save(training_state(run), state)
            last_state = state
            stats["checkpoints"] += 1
        if kills and s == kills[0] and last_state is not None:
            kills.pop(0)
            saved = torch.load(last_state, weights_only=True)
            del run  # the process dies; a new one starts from the last checkpoint
            run = new_run(args)
            restore(run, saved)
            stats["kills"] += 1
    return run


def check_checkpoints(folder: Path, x: torch.Tensor, stats: Counter) -> None:
    for path in sorted(folder.glob("model-*.pt")):
        raw = path.read_bytes()
        if b"kronfisher" in raw:
            stats["whole-model file REFERENCES kronfisher"] += 1
        model = torch.load(path, weights_only=False)
        model.zero_grad()
        per_example_loss(model(x), x, "bernoulli").mean().backward()  # runs, no preconditioner
        ok = all(bool(torch.isfinite(p).all()) for p in model.parameters())
        stats["whole-model files loaded" if ok else "whole-model file NON-FINITE"] += 1
    for path in sorted(folder.glob("state-*.pt")):
        state = torch.load(path, weights_only=True)
        kf.KFAC(build_model("mnist", "paper")).load_state_dict(state["pc"])
        stats["state files loaded"] += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--freq", type=int, default=20, help="T_cov = T_inv")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--damping", type=float, default=1e-2)
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--nan-rate", type=float, default=0.01)
    ap.add_argument("--overflow-rate", type=float, default=0.1,
                    help="fraction of the curvature batches scaled by 1e20")
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--failed-saves", type=int, default=2)
    ap.add_argument("--reference", action="store_true",
                    help="also run uninterrupted and compare the final parameters")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        data, source = kdata.load_dataset("mnist", "train"), "MNIST (cached)"
    except kdata.DatasetError as e:
        data, source = kdata.make_curves(4096, seed=1), f"generated CURVES ({e})"
    faults = Faults.draw(args)
    stats: Counter = Counter()
    print(f"soak: {args.steps} steps, batch {args.batch}, data {source}, {args.threads}"
          f" thread(s); faults: {len(faults.nan)} NaN batches, {len(faults.overflow)}"
          f" overflowing curvature batches, kills after steps {faults.kills}, failed saves"
          f" at steps {sorted(faults.failed_saves)}", flush=True)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="kronfisher-soak-") as tmp:
        folder = Path(tmp)
        losses: dict[int, float] = {}
        run = train(args, data, faults, folder, stats, losses)
        check_checkpoints(folder, data[:64], stats)
    finite = all(bool(torch.isfinite(p).all()) for p in run.model.parameters())
    if args.reference:
        ref = train(args, data, Faults(faults.nan, faults.overflow, [], set()), None, Counter(),
                    {})
        same = fingerprint(ref.model) == fingerprint(run.model)
        stats["final parameters equal the uninterrupted run's" if same
              else "final parameters DIFFER from the uninterrupted run's"] += 1
    print(f"done in {time.time() - t0:.0f} s")
    order = sorted(losses)
    first, last = [losses[s] for s in order[:50]], [losses[s] for s in order[-50:]]
    print(f"  per-pixel minibatch loss: first 50 steps {sum(first) / len(first):.4f},"
          f" last 50 {sum(last) / len(last):.4f}")
    for k, v in sorted(stats.items()):
        print(f"  {k}: {v}")
    bad = [k for k in stats if any(w in k for w in ("MISMATCH", "DID NOT", "DAMAGED",
                                                    "REFERENCES", "NON-FINITE", "DIFFER"))]
    assert finite, "a parameter is NaN/Inf"
    assert not bad, f"failed: {bad}"
    assert stats["kills"] == len(faults.kills) and stats["replayed steps"] > 0
    assert stats["skipped steps"] >= len(faults.nan)
    print("all assertions hold: no NaN parameter, every checkpoint loadable, every replay"
          " after a kill bit-identical" + (", resumed run = uninterrupted run" if args.reference
                                           else ""))


if __name__ == "__main__":
    main()
