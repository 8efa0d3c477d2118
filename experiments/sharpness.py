"""Sharpness of a trained run's final model: one cell of the ``sharpness`` suite.

Restores the last checkpoint of ``--workdir`` (:mod:`experiments.restore`) and, on a
fixed batch — the first ``--num_examples`` training images of the run's dataset,
normalized as in training, no augmentation, hard labels — with the model in
evaluation mode (BatchNorm running statistics, no dropout), computes with
:mod:`sadt_jax.sharpness`:

* the top Hessian eigenvalue of the cross-entropy (power iteration on
  Hessian-vector products, at most ``--num_iters``; the start vector comes from
  ``PRNGKey(--seed)``, so it is the same for every method);
* the worst-case loss increase within L2 radius rho for each of ``--rhos``
  (``--ascent_steps`` steps of projected normalized gradient ascent);
* the loss and accuracy on the batch.

Writes ``--out`` (JSON). Run::

  python -m experiments.sharpness --workdir=runs/fashion_mnist/sadt_t1_s0 \
      --out=runs/sharpness/sadt_t1_s0/sharpness.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Sequence

__all__ = ["main", "measure"]


def measure(
    workdir: str,
    *,
    num_examples: int = 512,
    num_iters: int = 20,
    tol: float = 1e-3,
    rhos: Sequence[str] = ("0.01", "0.05"),
    ascent_steps: int = 5,
    seed: int = 0,
) -> dict:
    """Sharpness measurements of the run in ``workdir`` (see the module docstring)."""
    import jax
    import jax.numpy as jnp

    from experiments.restore import restore_run
    from sadt_jax import sharpness
    from sadt_jax.data import normalize

    t0 = time.time()
    run = restore_run(workdir)
    ds, state = run.dataset, run.state
    n = min(num_examples, ds.num_train)
    images = normalize(jnp.asarray(ds.train_images[:n]), ds.mean, ds.std)
    labels = jnp.asarray(ds.train_labels[:n])
    batch = {"image": images, "label": labels}
    loss_fn = sharpness.model_loss_fn(state.apply_fn, state.model_state, batch)
    params = state.params

    @jax.jit
    def loss_and_acc(p):
        logits = state.apply_fn({"params": p, **state.model_state}, images, train=False)
        return loss_fn(p), jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))

    loss, acc = loss_and_acc(params)
    eig = jax.jit(
        lambda p: sharpness.hessian_top_eigenvalue(
            loss_fn, p, key=jax.random.PRNGKey(seed), num_iters=num_iters, tol=tol
        )
    )
    lam, info = eig(params)
    worst = jax.jit(
        lambda p, rho: sharpness.worst_case_loss_increase(
            loss_fn, p, rho=rho, num_steps=ascent_steps
        )
    )
    worst_case = {r: float(worst(params, jnp.float32(float(r)))) for r in rhos}
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    d = jax.devices()[0]
    return {
        "workdir": os.path.abspath(workdir),
        "method": run.config.method,
        "seed": int(run.config.seed),
        "checkpoint_step": int(run.step),
        "checkpoint_epoch": int(run.meta.get("epoch", -1)),
        "final_step": summary.get("steps"),
        "batch": f"first {n} training images, no augmentation, hard labels, eval mode",
        "num_examples": n,
        "loss": float(loss),
        "accuracy": float(acc),
        "hessian": {
            "top_eigenvalue": float(lam),
            "num_iters": int(info["num_iters"]),
            "max_iters": num_iters,
            "tol": tol,
            "converged": bool(info["converged"]),
            "residual": float(info["residual"]),
        },
        "worst_case_loss_increase": worst_case,
        "ascent_steps": ascent_steps,
        "seconds": time.time() - t0,
        "devices": {"platform": d.platform, "device_kind": d.device_kind},
        "python": platform.python_version(),
        "jax": jax.__version__,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m experiments.sharpness", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--workdir", required=True, help="A finished run (summary.json).")
    p.add_argument("--out", required=True, help="Output JSON path.")
    p.add_argument("--num_examples", type=int, default=512)
    p.add_argument("--num_iters", type=int, default=20)
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--rhos", default="0.01,0.05", help="Comma-separated radii.")
    p.add_argument("--ascent_steps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0, help="Power iteration start vector.")
    args = p.parse_args(argv)
    if not os.path.exists(os.path.join(args.workdir, "summary.json")):
        print(f"error: {args.workdir} has no summary.json (unfinished run)", file=sys.stderr)
        return 2
    result = measure(
        args.workdir,
        num_examples=args.num_examples,
        num_iters=args.num_iters,
        tol=args.tol,
        rhos=[r for r in args.rhos.split(",") if r],
        ascent_steps=args.ascent_steps,
        seed=args.seed,
    )
    if result["final_step"] is not None and result["checkpoint_step"] != result["final_step"]:
        print(
            f"warning: checkpoint step {result['checkpoint_step']} is not the final step "
            f"{result['final_step']}",
            file=sys.stderr,
        )
    result["command"] = " ".join(sys.argv)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, args.out)
    h = result["hessian"]
    print(
        f"{result['method']} seed {result['seed']} (step {result['checkpoint_step']}): "
        f"top Hessian eigenvalue {h['top_eigenvalue']:.4g} ({h['num_iters']} HVPs, "
        f"converged {h['converged']}), worst-case loss increase "
        + ", ".join(f"rho={k}: {v:.4g}" for k, v in result["worst_case_loss_increase"].items())
        + f", batch loss {result['loss']:.4f} acc {result['accuracy']:.4f}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
