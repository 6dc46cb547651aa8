"""GPU check (not a test): every method and preconditioner on CUDA agrees with the CPU.

Run on a machine with a CUDA GPU:  PYTHONPATH=src python benchmarks/gpu_check.py

1. approximate(): every method × solver × products path on CUDA (float64) against the
   same computation on the CPU.
2. Preconditioners on an MLP and a small CNN (float64): one collected step on CUDA and on
   the CPU from the same weights and data; the preconditioned gradients must agree.
3. A few float32 training steps of the CURVES auto-encoder (paper preset) per method on
   CUDA, with a rough step time.
Prints one line per check and exits non-zero on any disagreement.
"""

from __future__ import annotations

import copy
import sys
import time

import torch
from torch import nn

import kronfisher as kf
from kronfisher.bench.problems import build_model
from kronfisher.linalg import spatial_pair_mask

CLASSES = {"kfac": kf.KFAC, "kpsvd": kf.KPSVD, "deflation": kf.Deflation,
           "kfac_corrected": kf.KFACCorrected, "lanczos": kf.Lanczos}


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x.cpu() - y.cpu()).norm() / y.cpu().norm().clamp_min(1e-300))


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    dev = torch.device("cuda")
    print("device:", torch.cuda.get_device_name(0), "torch", torch.__version__)
    failures = 0

    def check(name: str, err: float, tol: float) -> None:
        nonlocal failures
        ok = err <= tol
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name}: rel. diff {err:.2e} (tol {tol:.0e})")

    torch.manual_seed(0)
    D = torch.float64
    a = torch.randn(64, 9, dtype=D)
    a[:, -1] = 1
    g = torch.randn(64, 7, dtype=D) * torch.rand(64, 1, dtype=D)
    for method in kf.METHODS:
        for solver in ("power", "lanczos", "gram"):
            for products in ("gram", "direct"):
                if method == "kfac" and (solver, products) != ("power", "gram"):
                    continue
                if solver == "gram" and products == "direct":
                    continue
                kw = {} if method == "kfac" else {"solver": solver, "products": products}
                cpu = kf.approximate(a, g, method, **kw).to_dense()
                gpu = kf.approximate(a.to(dev), g.to(dev), method, **kw).to_dense()
                check(f"approximate {method}/{solver}/{products}", rel(gpu, cpu), 1e-8)
    ac, gc = torch.randn(6, 9, 5, dtype=D), torch.randn(6, 9, 3, dtype=D)
    mask = spatial_pair_mask(3, 3, 1).to(D)
    cpu = kf.approximate(ac, gc, "lanczos", pair_mask=mask).to_dense()
    gpu = kf.approximate(ac.to(dev), gc.to(dev), "lanczos", pair_mask=mask.to(dev)).to_dense()
    check("approximate conv radius 1", rel(gpu, cpu), 1e-8)

    def nets():
        torch.manual_seed(1)
        mlp = nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 4)).double()
        cnn = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(),
                            nn.Conv2d(4, 2, 3, stride=2), nn.Flatten()).double()
        return mlp, cnn

    for idx, (x, kind) in enumerate([(torch.randn(32, 10, dtype=D), "mlp"),
                                     (torch.randn(16, 2, 8, 8, dtype=D), "cnn")]):
        for name, cls in list(CLASSES.items()) + [("exact", None)]:
            if name == "exact" and kind == "cnn":
                continue
            grads = []
            for device in ("cpu", dev):
                model = copy.deepcopy(nets()[idx]).to(device)
                if cls is None:
                    pc = kf.ExactNG(model, damping=1e-2, block_diagonal=False)
                else:
                    pc = cls(model, damping=1e-2, conv_radius="all" if kind == "cnn" else 0)
                with pc.collect():  # deterministic loss: CPU and CUDA RNG streams differ
                    (model(x.to(device)) - 1).square().sum().div(len(x)).backward()
                model.zero_grad()
                model(x.to(device)).square().sum().div(len(x)).backward()
                pc.step()
                grads.append(torch.cat([p.grad.flatten().cpu() for p in model.parameters()]))
            check(f"preconditioner {name} on {kind}", rel(grads[1], grads[0]), 1e-7)

    x = torch.rand(256, 784, device=dev)
    for name, cls in CLASSES.items():
        model = build_model("curves", "paper").to(dev)
        # the paper preset's CURVES settings, on its per-pixel-mean objective
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        pc = cls(model, damping=3e-3, cov_update_freq=10, inv_update_freq=10, kl_clip=0.01,
                 lr=0.1)
        losses = []
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(30):
            if pc.steps % 10 == 0:
                with pc.collect():
                    (kf.sampled_nll(model(x[:64]), "bernoulli") / 784).backward()
            opt.zero_grad()
            loss = nn.functional.binary_cross_entropy_with_logits(model(x), x)
            loss.backward()
            pc.step()
            opt.step()
            losses.append(loss.item())
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / 30
        finite = all(torch.isfinite(torch.tensor(losses)))
        failures += not finite
        print(f"{'ok  ' if finite else 'FAIL'} CURVES {name} on CUDA: loss/pixel {losses[0]:.4f}"
              f" → {losses[-1]:.4f}, {dt * 1e3:.1f} ms/step (T_cov = T_inv = 10)")
    print("failures:", failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
