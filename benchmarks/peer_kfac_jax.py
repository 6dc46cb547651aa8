"""kfac-jax's optimizer on our auto-encoder problems, as a peer in the race (issue 15).

Runs in its own environment, not the library's (kfac-jax 0.0.8 works with jax/jaxlib
0.9.0.1, optax 0.2.8, dm-haiku 0.0.17 and fails under jax 0.10.2)::

    python3 -m venv /tmp/jaxenv && /tmp/jaxenv/bin/pip install "jax==0.9.0.1" \
        "jaxlib==0.9.0.1" "optax==0.2.8" "dm-haiku==0.0.17" "kfac-jax==0.0.8"
    PYTHONPATH=src python benchmarks/export_problem.py --problem curves --seed 0 \
        --iterations 3000 --out /tmp/curves-seed0.npz
    taskset -c 0 /tmp/jaxenv/bin/python benchmarks/peer_kfac_jax.py /tmp/curves-seed0.npz \
        --out DIR [--mode adaptive|fixed]

The network, initial weights and minibatches are ours (the ``paper`` preset's, exported
by ``export_problem.py``); the optimizer settings are kfac-jax's own auto-encoder example
(``examples/autoencoder_mnist/pipeline.py``): the loss summed over pixels and averaged
over the batch, l2 1e-5, Levenberg–Marquardt damping from 150 (interval 5, decay 0.95,
[1e-5, 1000]), T_inv 5, curvature EMA 0.95, 5 burn-in steps, automatic learning rate and
momentum (``--mode fixed``: lr 0.1, momentum 0.9 instead). One XLA thread
(``--xla_cpu_multi_thread_eigen=false``). Writes ``DIR/runs/kfac_jax[_fixed].iterations.csv``
(``iteration,wall_time,minibatch_loss_pixel``: the per-pixel loss of the minibatch before the
update, as ours) and a JSON with the damping, α and μ per step. The first step's time
includes jit compilation; it is reported separately and not counted in ``wall_time``.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false"
                      " intra_op_parallelism_threads=1")

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import haiku as hk  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import kfac_jax  # noqa: E402
import numpy as np  # noqa: E402

L2 = 1e-5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path, help="npz written by export_problem.py")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--mode", choices=["adaptive", "fixed"], default="adaptive")
    ap.add_argument("--iterations", type=int, default=None)
    ap.add_argument("--time-budget", type=float, default=None)
    args = ap.parse_args()
    z = np.load(args.data)
    train, batches = z["train"], z["batches"]
    likelihood = str(z["likelihood"])
    n_layers = sum(1 for k in z.files if k.startswith("W"))
    widths = [z[f"W{i}"].shape[0] for i in range(n_layers)]
    D = train.shape[1]

    def net(x):
        for i, w in enumerate(widths):
            x = hk.Linear(w, name=f"linear_{i}")(x)
            if i < n_layers - 1:
                x = jax.nn.relu(x)
        return x

    model = hk.without_apply_rng(hk.transform(net))
    params = {f"linear_{i}": {"w": jnp.asarray(z[f"W{i}"].T), "b": jnp.asarray(z[f"b{i}"])}
              for i in range(n_layers)}

    def nll_sum(out, x):  # per example, summed over pixels
        if likelihood == "bernoulli":
            return jnp.sum(jnp.maximum(out, 0) - out * x + jnp.log1p(jnp.exp(-jnp.abs(out))), 1)
        return 0.5 * jnp.sum((out - x) ** 2, 1)

    def loss_fn(p, x):
        out = model.apply(p, x)
        if likelihood == "bernoulli":
            kfac_jax.register_sigmoid_cross_entropy_loss(out, x)
        else:
            kfac_jax.register_squared_error_loss(out, x)
        nll = jnp.mean(nll_sum(out, x))
        l2 = 0.5 * sum(jnp.sum(v ** 2) for v in jax.tree_util.tree_leaves(p))
        return nll + L2 * l2, nll

    adaptive = args.mode == "adaptive"
    opt = kfac_jax.Optimizer(
        value_and_grad_func=jax.value_and_grad(loss_fn, has_aux=True),
        l2_reg=L2, value_func_has_aux=True,
        use_adaptive_learning_rate=adaptive, use_adaptive_momentum=adaptive,
        use_adaptive_damping=True, initial_damping=150.0, min_damping=1e-5,
        max_damping=1000.0, damping_adaptation_interval=5, damping_adaptation_decay=0.95,
        inverse_update_period=5, num_burnin_steps=5, curvature_ema=0.95,
        learning_rate_schedule=None if adaptive else (lambda _: 0.1),
        momentum_schedule=None if adaptive else (lambda _: 0.9),
        multi_device=False)
    rng = jax.random.PRNGKey(0)
    iters = len(batches) if args.iterations is None else min(args.iterations, len(batches))

    def batch(i):
        idx = batches[i]
        return jnp.asarray(train[idx[idx >= 0]])

    rng, k = jax.random.split(rng)
    state = opt.init(params, k, batch(0))
    # burn-in (curvature only) on our first 5 minibatches, then the steps see our order
    rows, trace, wall, compile_s = [], [], 0.0, None
    px = (2.0 if likelihood == "gaussian" else 1.0) / D
    for i in range(iters):
        rng, k = jax.random.split(rng)
        t0 = time.perf_counter()
        if i == 0:  # the burn-in reads the iterator, then the step takes its next batch
            stream = iter([batch(j) for j in range(5)] + [batch(0)])
            params, state, stats = opt.step(params, state, k, data_iterator=stream,
                                            global_step_int=i)
        else:
            params, state, stats = opt.step(params, state, k, batch=batch(i),
                                            global_step_int=i)
        jax.block_until_ready(params)
        dt = time.perf_counter() - t0
        if i == 0:
            compile_s = dt
        else:
            wall += dt
        nll = float(stats["aux"]) if "aux" in stats else float(stats["loss"])
        rows.append({"iteration": i + 1, "wall_time": wall, "minibatch_loss_pixel": nll * px})
        trace.append({k2: float(stats[k2]) for k2 in ("damping", "learning_rate", "momentum",
                                                      "rho") if k2 in stats})
        if args.time_budget is not None and wall >= args.time_budget:
            break
    name = "kfac_jax" if adaptive else "kfac_jax_fixed"
    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    with open(args.out / "runs" / f"{name}.iterations.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["iteration", "wall_time", "minibatch_loss_pixel"])
        w.writeheader()
        w.writerows(rows)
    (args.out / "runs" / f"{name}.kfac_jax.json").write_text(json.dumps(
        {"compile_and_first_step_s": compile_s, "iterations": len(rows), "trace": trace,
         "versions": {"jax": jax.__version__, "kfac_jax": "0.0.8"}}))
    print(f"{name}: {len(rows)} steps, {wall:.1f} s after the first ({compile_s:.1f} s with"
          f" compilation), last loss {rows[-1]['minibatch_loss_pixel']:.4f}")


if __name__ == "__main__":
    main()
