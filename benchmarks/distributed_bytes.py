"""Bytes and time per step of data-parallel preconditioning, and the cost-model projection.

    PYTHONPATH=src python benchmarks/distributed_bytes.py --threads 1 --steps 3

MNIST auto-encoder of the ``paper`` preset (float32), global minibatch 512, curvature batch
128 (a quarter) with sampled targets, T_cov = T_inv = 1 (every step is a curvature update
and a refactorisation), SGD on the preconditioned gradients. W = 1 and W = 2 gloo
processes on this machine (``--threads`` per process); per method the mean seconds per step
after one warm-up step and the bytes each rank handed to collectives per step, by purpose.
Then the cost model's wire bytes per rank per curvature update for W = 8, 64, 512.

    PYTHONPATH=src python benchmarks/distributed_bytes.py --model transformer

The same projection for examples/char_transformer.py's model (its defaults: d = 128, two
blocks, 64 positions, 16 curvature sequences per update; Linear layers on (B, S, d) with
weight_sharing="expand", so N = sequences × 64 tokens), and nothing measured. Its
embeddings and LayerNorms are not Kronecker blocks: their per-example statistics are
all-gathered for every method (a column of its own).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
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


MNIST_WIDTHS = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
WORLDS = (2, 8, 64, 512)


def mnist_curvature(W: int) -> int:
    """Curvature examples per update at W ranks: 128, or 16 per rank beyond W = 8."""
    return max(128 * W // 8 if W >= 8 else 128, 128)


def transformer_curvature(W: int) -> int:
    """Curvature sequences per update: the example's 16, or 2 per rank beyond W = 8."""
    return max(16, 2 * W)


def transformer_layers() -> tuple[list[tuple[int, int]], list[tuple[str, int, int]], int]:
    """(d_a, d_g) of its Linear layers, (kind, d_g, d_a) of the others, and S, read off the
    example's model by a single-process preconditioner (the shapes the ranks would use)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from char_transformer import CharTransformer, Settings

    import kronfisher as kf

    s = Settings()
    pc = kf.KFAC(CharTransformer(d=s.d, layers=s.layers, seq=s.seq))
    kron, other = [], []
    for st in pc.layers.values():
        dg, da = (int(v) for v in st.adapter.layout.shape)
        if st.adapter.kind == "dense":
            kron.append((da, dg))
        else:
            other.append((st.adapter.kind, dg, da))
    return kron, other, s.seq


def gathered_bytes(other: list[tuple[str, int, int]], examples: int, T: int, W: int) -> float:
    """Wire bytes per rank of all-gathering the non-Kronecker layers' statistics (float32).

    An embedding sends its token ids (int64) and output gradients (d numbers) per position,
    a LayerNorm x̂ and the output gradient (C numbers each) per position.
    """
    total = 0.0
    for kind, dg, _ in other:
        per_pos = 8 + 4 * dg if kind == "embedding" else 2 * 4 * dg
        total += wire_bytes_of("all_gather", examples * T * per_pos / W, W)
    return total


def wire_bytes_of(kind: str, payload: float, W: int) -> float:
    from kronfisher.distributed.comm import wire_bytes

    return wire_bytes(kind, int(payload), W)


def projection(model: str = "mnist") -> dict:
    """Wire bytes per rank per curvature update (float32), the chosen strategy per layer.

    Per W: the curvature batch (examples or sequences), KFAC's all-reduced factors, the
    SVD methods' cheapest strategy by the cost model (rank 1 and rank 2), and, for the
    transformer, the all-gathered statistics of its embeddings and LayerNorms (the same for
    every method, not included in the other columns).
    """
    from kronfisher.distributed.cost import CostModel, LayerShape, gather_cost, krylov_cost

    if model == "mnist":
        layers = [(i + 1, o) for i, o in zip(MNIST_WIDTHS[:-1], MNIST_WIDTHS[1:])]
        other: list[tuple[str, int, int]] = []
        T, curvature = 1, mnist_curvature
    else:
        layers, other, T = transformer_layers()
        curvature = transformer_curvature
    cost = CostModel()
    rows = {}
    for W in WORLDS:
        m = curvature(W)
        kfac = sum(wire_bytes_of("all_reduce", 4 * (da * da + dg * dg), W) for da, dg in layers)
        rows[W] = {"curvature_batch": m, "kfac": kfac,
                   "gathered": gathered_bytes(other, m, T, W)}
        for k, name in ((1, "kpsvd"), (2, "rank2")):
            tot, gather_only, chosen = 0.0, 0.0, []
            for da, dg in layers:
                shape = LayerShape(da, dg, m * T, T, True, terms=k, itemsize=4)
                g, kr = gather_cost(shape, W, cost, True), krylov_cost(shape, W, cost)
                best = g if g.seconds <= kr.seconds else kr
                chosen.append("gather" if best is g else "krylov")
                tot += best.wire_bytes
                gather_only += g.wire_bytes
            rows[W][name] = (tot, chosen)
            rows[W][name + "_gather"] = gather_only
    return rows


def print_projection(model: str) -> None:
    unit = "examples" if model == "mnist" else "sequences × 64 tokens"
    print(f"projection, {model}: wire MB per rank per curvature update (float32)")
    print(f"| W | curvature batch ({unit}) | KFAC | KPSVD (ratio; strategy) | rank-2 (ratio)"
          " | KPSVD all gather (ratio) | gathered embedding/LayerNorm stats |")
    print("|---|---|---|---|---|---|---|")
    for W, row in projection(model).items():
        k1, c1 = row["kpsvd"]
        k2, c2 = row["rank2"]
        kinds = "/".join(sorted(set(c1)))
        mixed = "" if set(c2) == set(c1) else f"; {'/'.join(sorted(set(c2)))}"
        print(f"| {W} | {row['curvature_batch']} | {row['kfac'] / 1e6:.2f} |"
              f" {k1 / 1e6:.2f} ({k1 / row['kfac']:.2f}×; {kinds}) |"
              f" {k2 / 1e6:.2f} ({k2 / row['kfac']:.2f}×{mixed}) |"
              f" {row['kpsvd_gather'] / 1e6:.2f} ({row['kpsvd_gather'] / row['kfac']:.2f}×) |"
              f" {row['gathered'] / 1e6:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", choices=["mnist", "transformer"], default="mnist",
                    help="mnist: measure W = 1, 2 and project; transformer: project only")
    args = ap.parse_args()
    if args.model == "transformer":
        print_projection("transformer")
        return
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
    print_projection("mnist")


if __name__ == "__main__":
    main()
