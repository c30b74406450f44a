"""The KL under one prior per weight (PWFN's): three ways to compute its terms.

Each weight's term is ``log(s/sigma) + (sigma^2 + (mu - m)^2) / (2 s^2) - 1/2``. Side by side
in one run, for LeNet-5's 61,470 weights and DeiT-Tiny's 5,647,872:

- ``pqnet``: ``pqnet.bnn.convert.normal_kl``, the terms in a form that does not cancel,
  ``(r - 1 - log r) / 2 + (mu - m)^2 / (2 s^2)`` with ``r = sigma^2 / s^2``, in float32,
  summed in float64;
- ``plain_float32``: the terms as written, in float32, summed in float64 (pqnet before);
- ``float64``: the terms as written, in float64.

Measured: the **error** of each against the exact float64 KL, on weights within 1e-3 of a
N(0.2, 0.5^2) prior (each term about 1e-6, so the plain terms nearly cancel: the hard
case); the **seconds** of a forward and backward of the KL of PWFN-like weights (means
N(0, 0.02^2), sds from a softplus, prior N(mu_0, 0.05^2)), the best of ``--repeat``
timings of 5 calls. Every variant gets the same inputs.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/kl_precision.py \\
        --json benchmarks/kl_precision.json
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from pqnet._io import save_json
from pqnet.bnn.convert import normal_kl
from pqnet.diagnostics.table import format_table

SIZES = {"lenet5": 61_470, "deit_tiny": 5_647_872}


def plain_terms(loc, var, prior_loc, prior_scale) -> torch.Tensor:
    return ((prior_scale.log() - 0.5 * var.log()
             + (var + (loc - prior_loc).square()) / (2 * prior_scale.square()) - 0.5)
            .sum(dtype=torch.float64))


def exact_kl(loc, var, prior_loc, prior_scale) -> torch.Tensor:
    return plain_terms(*(t.double() for t in (loc, var, prior_loc, prior_scale)))


VARIANTS = {
    "pqnet": normal_kl,
    "plain_float32": lambda *a: plain_terms(*a).to(a[0].dtype),
    "float64": lambda *a: exact_kl(*a).to(a[0].dtype),
}


def relative_error(kl, n: int) -> float:
    gen = torch.Generator().manual_seed(0)
    loc = 0.2 + 1e-3 * torch.randn(n, generator=gen)
    var = 0.25 * (1 + 1e-3 * torch.randn(n, generator=gen))
    m, s = torch.full((n,), 0.2), torch.full((n,), 0.5)
    exact = float(exact_kl(loc, var, m, s))
    return abs(float(kl(loc, var, m, s)) - exact) / exact


def seconds(kl, n: int, repeat: int) -> float:
    gen = torch.Generator().manual_seed(1)
    mu = (0.02 * torch.randn(n, generator=gen)).requires_grad_()
    rho = torch.full((n,), -4.0, requires_grad=True)
    m, s = mu.detach().clone(), torch.full((n,), 0.05)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(5):
            kl(mu, F.softplus(rho).square(), m, s).backward()
        best = min(best, (time.perf_counter() - start) / 5)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    for name, n in SIZES.items():
        row = {"network": name, "weights": n}
        for label, kl in VARIANTS.items():
            row[f"{label}_error"] = relative_error(kl, n)
            row[f"{label}_ms"] = 1e3 * seconds(kl, n, args.repeat)
        rows.append(row)
    shown = [{k: f"{v:.1e}" if k.endswith("error") else v for k, v in row.items()}
             for row in rows]
    print(format_table(shown, list(rows[0])))
    if args.json:
        save_json({"rows": rows, "torch_threads": torch.get_num_threads(),
                   "load_average": os.getloadavg()}, args.json)


if __name__ == "__main__":
    main()
