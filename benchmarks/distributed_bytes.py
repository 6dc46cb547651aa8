"""Bytes and time per step of data-parallel preconditioning, and the cost-model projection.

    PYTHONPATH=src python benchmarks/distributed_bytes.py --threads 1 --steps 3

MNIST auto-encoder of the ``paper`` preset (float32), global minibatch 512, curvature batch
128 (a quarter) with sampled targets, T_cov = T_inv = 1 (every step is a curvature update
and a refactorisation), SGD on the preconditioned gradients. W = 1 and W = 2 gloo
processes on this machine (``--threads`` per process); per method the mean seconds per step
after one warm-up step and the bytes each rank handed to collectives per step, by purpose.
Then the cost model's wire bytes per rank per curvature update for W = 8, 64, 512.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

METHODS = ("kfac", "kpsvd", "deflation", "kfac_corrected", "lanczos")
BATCH, CURV = 512, 128


def worker(rank: int, world: int, tmp: str, steps: int, threads: int) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", store=dist.FileStore(os.path.join(tmp, "store"), world),
                            rank=rank, world_size=world, timeout=timedelta(seconds=600))
    import kronfisher as kf
    from kronfisher.bench.problems import build_model, per_example_loss
    from kronfisher.distributed import shard_generator

    classes = {"kfac": kf.KFAC, "kpsvd": kf.KPSVD, "deflation": kf.Deflation,
               "kfac_corrected": kf.KFACCorrected, "lanczos": kf.Lanczos}
    x_all = torch.rand(BATCH, 784, generator=torch.Generator().manual_seed(0))
    out = {}
    for method in METHODS:
        model = build_model("mnist", "paper")
        pc = classes[method](model, damping=1e-3)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        x = torch.tensor_split(x_all, world)[rank]
        xc = torch.tensor_split(x_all[:CURV], world)[rank]
        times = []
        for step in range(steps + 1):
            if step == 1 and pc.sync.active:
                pc.sync.comm.ledger.clear()  # count the measured steps only
            t0 = time.perf_counter()
            opt.zero_grad()
            with pc.collect():
                kf.sampled_nll(model(xc), "bernoulli",
                               generator=shard_generator(step, rank)).backward()
            opt.zero_grad()
            (per_example_loss(model(x), x, "bernoulli").sum() / BATCH).backward()
            if world > 1:
                flat = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
                dist.all_reduce(flat)
                off = 0
                for p in model.parameters():
                    p.grad = flat[off:off + p.numel()].view_as(p).clone()
                    off += p.numel()
            pc.step()
            opt.step()
            if step:
                times.append(time.perf_counter() - t0)
        led = pc.sync.comm.ledger.entries if pc.sync.active else {}
        out[method] = {"seconds": sum(times) / len(times),
                       "strategies": dict(getattr(pc.sync, "strategies", {})),
                       "bytes": {k: e.payload / steps for k, e in led.items()},
                       "wire": {k: e.wire / steps for k, e in led.items()}}
    Path(tmp, f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def measure(world: int, steps: int, threads: int) -> list[dict]:
    tmp = tempfile.mkdtemp()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=worker, args=(r, world, tmp, steps, threads))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]


def projection() -> dict:
    """Wire bytes per rank per curvature update (float32), the chosen strategy per layer."""
    from kronfisher.distributed.comm import wire_bytes
    from kronfisher.distributed.cost import CostModel, LayerShape, gather_cost, krylov_cost

    widths = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
    layers = [(i + 1, o) for i, o in zip(widths[:-1], widths[1:])]  # (d_a with bias, d_g)
    model = CostModel()
    rows = {}
    for W in (2, 8, 64, 512):
        m = 128 * W // 8 if W >= 8 else 128  # per-rank curvature share at least 16
        m = max(m, 128)
        kfac = sum(wire_bytes("all_reduce", 4 * (da * da + dg * dg), W) for da, dg in layers)
        for k, name in ((1, "kpsvd"), (2, "rank2")):
            tot, chosen = 0.0, []
            for da, dg in layers:
                s = LayerShape(da, dg, m, terms=k, itemsize=4)
                g, kr = gather_cost(s, W, model, True), krylov_cost(s, W, model)
                best = g if g.seconds <= kr.seconds else kr
                chosen.append("gather" if best is g else "krylov")
                tot += best.wire_bytes
            rows.setdefault(W, {"curvature_batch": m, "kfac": kfac})[name] = (tot, chosen)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    res = {w: measure(w, args.steps, args.threads) for w in (1, 2)}
    print(f"threads per process: {args.threads}; global batch {BATCH}, curvature {CURV}")
    print("| method | s/step W=1 | s/step W=2 | bytes/step/rank W=2 (payload) | by purpose |")
    print("|---|---|---|---|---|")
    for m in METHODS:
        r1, r2 = res[1][0][m], res[2][0][m]
        by = ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sorted(r2["bytes"].items())
                       if v > 1e3)
        print(f"| {m} | {r1['seconds']:.3f} | {r2['seconds']:.3f} |"
              f" {sum(r2['bytes'].values()) / 1e6:.2f} MB | {by} |")
    print()
    print("| W | curvature batch | KFAC wire MB/rank | KPSVD wire MB/rank (ratio) | rank-2 |")
    print("|---|---|---|---|---|")
    for W, row in projection().items():
        k1, c1 = row["kpsvd"]
        k2, _ = row["rank2"]
        print(f"| {W} | {row['curvature_batch']} | {row['kfac'] / 1e6:.2f} |"
              f" {k1 / 1e6:.2f} ({k1 / row['kfac']:.2f}×; {'/'.join(sorted(set(c1)))}) |"
              f" {k2 / 1e6:.2f} ({k2 / row['kfac']:.2f}×) |")


if __name__ == "__main__":
    main()
