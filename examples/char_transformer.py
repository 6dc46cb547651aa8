r"""A small decoder-only transformer on generated arithmetic text: Kronecker-SVD NG vs AdamW.

The corpus is generated (no download): lines ``"a+b=c\\n"`` with a, b uniform in [0, 10^k)
drawn from a seeded ``torch.Generator``; the character stream is cut into sequences of
``--seq`` characters. Predicting the digits of c needs attention to the operands, so
the loss has structure below the unigram entropy. The model: token and position
embeddings, ``--layers`` pre-LayerNorm blocks (causal self-attention with ``nn.Linear``
projections on (B, S, d) inputs, a GELU MLP), a final LayerNorm and a Linear head.
Every parameter is preconditioned: Linear layers with weight sharing over positions,
the embeddings, and the LayerNorms' scale and shift.

Run (each method for the same wall-clock budget, one thread)::

    python examples/char_transformer.py --methods kpsvd,kfac_corrected,adamw --time-budget 50

It prints the loss at the end of each budget and writes ``loss_vs_time.csv`` (and a plot
when matplotlib is installed) to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kronfisher as kf

VOCAB = "0123456789+=\n"
KRONECKER = {"kfac": kf.KFAC, "kpsvd": kf.KPSVD, "deflation": kf.Deflation,
             "kfac_corrected": kf.KFACCorrected, "lanczos": kf.Lanczos}
DOCUMENTED_SKIPS: frozenset[str] = frozenset()
"""Parameters of :class:`CharTransformer` a Kronecker preconditioner leaves untouched."""


def make_corpus(n_lines: int, digits: int = 3, seed: int = 0) -> Tensor:
    r"""Token ids (int64, 1-D) of ``n_lines`` generated lines ``"a+b=c\n"``."""
    gen = torch.Generator().manual_seed(seed)
    ab = torch.randint(0, 10**digits, (n_lines, 2), generator=gen)
    text = "".join(f"{a}+{b}={a + b}\n" for a, b in ab.tolist())
    table = {c: i for i, c in enumerate(VOCAB)}
    return torch.tensor([table[c] for c in text], dtype=torch.int64)


def batches(tokens: Tensor, batch: int, seq: int, seed: int):
    """Endless random (inputs, targets) windows of ``seq`` tokens, (batch, seq) each."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        start = torch.randint(0, tokens.numel() - seq - 1, (batch,), generator=gen)
        idx = start[:, None] + torch.arange(seq + 1)
        window = tokens[idx]
        yield window[:, :-1], window[:, 1:]


class Block(nn.Module):
    """Pre-LayerNorm transformer block: causal self-attention and a GELU MLP."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        """(B, S, d) → (B, S, d)."""
        B, S, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (t.reshape(B, S, self.heads, d // self.heads).transpose(1, 2)
                   for t in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(B, S, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class CharTransformer(nn.Module):
    """Decoder-only character model: (B, S) token ids → (B, S, V) logits."""

    def __init__(self, vocab: int = len(VOCAB), d: int = 128, layers: int = 2, heads: int = 4,
                 seq: int = 64):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq, d)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: Tensor) -> Tensor:
        """Logits (B, S, V) for token ids (B, S)."""
        B, S = idx.shape
        pos = torch.arange(S, device=idx.device).expand(B, S)  # per example: weight sharing
        return self.head(self.ln(self.blocks(self.tok(idx) + self.pos(pos))))


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-character cross-entropy over all B·S positions (nats)."""
    return F.cross_entropy(logits.transpose(1, 2), targets)


@dataclass
class Settings:
    """What one run uses; the defaults are the example's."""

    batch: int = 32
    seq: int = 64
    d: int = 128
    layers: int = 2
    lr_adamw: float = 3e-3
    lr_ng: float = 0.1
    damping: float = 3e-3
    kl_clip: float = 1e-3
    update_freq: int = 10
    curvature_examples: int = 8
    seed: int = 0


@dataclass
class Trace:
    """Loss of every step against training seconds (evaluation time excluded)."""

    method: str
    seconds: list[float]
    losses: list[float]
    skipped: list[str]


class Stepper:
    """One fresh model (same init for every method) and its optimizer, stepped on demand.

    Args:
        method: "adamw" or a Kronecker method (a key of :data:`KRONECKER`).
        s: the settings.
        tokens: the corpus (default: :func:`make_corpus` with 20,000 lines).
    """

    def __init__(self, method: str, s: Settings, tokens: Tensor | None = None):
        torch.manual_seed(s.seed)
        self.method, self.s = method, s
        self.model = CharTransformer(d=s.d, layers=s.layers, seq=s.seq)
        tokens = make_corpus(20_000, seed=s.seed) if tokens is None else tokens
        self.data = batches(tokens, s.batch, s.seq, seed=s.seed + 1)
        self.gen = torch.Generator().manual_seed(s.seed + 2)
        self.precond: kf.KroneckerPreconditioner | None = None
        if method == "adamw":
            self.opt: torch.optim.Optimizer = torch.optim.AdamW(self.model.parameters(),
                                                                lr=s.lr_adamw)
        else:
            self.precond = KRONECKER[method](
                self.model, damping=s.damping, cov_update_freq=s.update_freq,
                inv_update_freq=s.update_freq, kl_clip=s.kl_clip, lr=s.lr_ng,
                damping_scheme="factored")
            self.opt = torch.optim.SGD(self.model.parameters(), lr=s.lr_ng, momentum=0.9)

    @property
    def skipped(self) -> list[str]:
        """The parameters the preconditioner leaves untouched (none for AdamW)."""
        return list(self.precond.skipped) if self.precond is not None else []

    def run(self, n: int) -> list[float]:
        """Take ``n`` training steps; return their minibatch losses.

        Raises:
            FloatingPointError: a non-finite loss.
        """
        model, precond, s = self.model, self.precond, self.s
        losses = []
        for _ in range(n):
            x, y = next(self.data)
            if precond is not None and precond.collect_due:
                with precond.collect():
                    logits = model(x[: s.curvature_examples])
                    kf.sampled_nll(logits.transpose(1, 2), "categorical", generator=self.gen,
                                   reduction="mean").backward()
            self.opt.zero_grad()
            loss = lm_loss(model(x), y)
            loss.backward()
            if precond is not None:
                precond.step()
            self.opt.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"{self.method}: loss {value}")
            losses.append(value)
        return losses


def train(method: str, s: Settings, *, steps: int | None = None,
          time_budget: float | None = None, tokens: Tensor | None = None) -> Trace:
    """Train one fresh model and record the loss of every step against training seconds.

    Args:
        method: "adamw" or a Kronecker method (a key of :data:`KRONECKER`).
        s: the settings.
        steps: stop after this many steps (this or ``time_budget`` needed).
        time_budget: stop after this many training seconds.
        tokens: the corpus (default: :func:`make_corpus` with 20,000 lines).
    """
    if steps is None and time_budget is None:
        raise ValueError("give steps or time_budget")
    run = Stepper(method, s, tokens)
    trace = Trace(method, [], [], run.skipped)
    elapsed = 0.0
    while (steps is None or len(trace.losses) < steps) and (
            time_budget is None or elapsed < time_budget):
        t0 = time.perf_counter()
        (loss,) = run.run(1)
        elapsed += time.perf_counter() - t0
        trace.seconds.append(elapsed)
        trace.losses.append(loss)
    return trace


def smoothed(losses: list[float], window: int = 20) -> float:
    """Mean of the last ``window`` losses."""
    tail = losses[-window:]
    return sum(tail) / len(tail)


def main(argv: list[str] | None = None) -> None:
    """Race the methods for equal wall-clock time; print and write the loss-vs-time."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="kpsvd,kfac_corrected,adamw")
    p.add_argument("--time-budget", type=float, default=50.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("results/example-transformer"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    s = Settings(seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    traces = [train(m, s, time_budget=args.time_budget) for m in args.methods.split(",")]
    with open(args.out / "loss_vs_time.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "step", "seconds", "loss"])
        for t in traces:
            for i, (sec, loss) in enumerate(zip(t.seconds, t.losses)):
                w.writerow([t.method, i + 1, f"{sec:.4f}", f"{loss:.6f}"])
    print(f"{'method':16s} {'steps':>6s} {'s/step':>8s} {'loss (last 20)':>15s}")
    for t in traces:
        print(f"{t.method:16s} {len(t.losses):6d} {t.seconds[-1] / len(t.losses):8.4f}"
              f" {smoothed(t.losses):15.4f}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for t in traces:
        ax.plot(t.seconds, t.losses, label=t.method, lw=0.8)
    ax.set(xlabel="training seconds", ylabel="loss (nats/char)", yscale="log")
    ax.legend()
    fig.savefig(args.out / "loss_vs_time.png", dpi=120, bbox_inches="tight")
    print(f"plot: {args.out / 'loss_vs_time.png'}")


if __name__ == "__main__":
    main()
