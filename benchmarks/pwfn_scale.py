"""PWFN's assignment step at DeiT-Tiny scale (about 5.7M weights), against a dense one.

Side by side in one run:

- **pqnet**: :class:`pqnet.quantize.pwfn.WeightFixer`, which finds each weight's reachable
  centres by two binary searches and counts them with a difference array;
- **dense**: the same greedy rule on the full ``weights x centres`` matrix of distances
  ``|mu - c| / sigma`` (what a direct reading of the paper computes), on a subset of the
  weights, because the full matrix would take ``5.7M x 431 x 4 B = 9.8 GB``.

Both run all ten rounds of PWFN's schedule (no retraining between rounds: this is the
assignment alone) on a synthetic posterior with DeiT-Tiny's conv/linear weight shapes; the
two must give the same assignment on the subset. Then ``pqnet.quantize(posterior, "pwfn",
retrain_epochs=0)`` runs end to end at full scale (BNN set-up, rounds, QuantizedNet). Peak
memory is the process's peak resident set (``ru_maxrss``) above what it held before.

    .venv/bin/python benchmarks/pwfn_scale.py [--subset 100000] [--json benchmarks/pwfn_scale.json]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time

import torch
from torch import nn

import pqnet
from pqnet._io import save_json
from pqnet.bnn import LayerInfo
from pqnet.quantize.pwfn import SCHEDULE, TIE_TOLERANCE, WeightFixer

# DeiT-Tiny (Touvron et al. 2021): 16x16 patch embedding, 12 blocks of width 192, MLP 768
DEIT_TINY = ([("patch_embed", (192, 3, 16, 16))]
             + [(f"blocks.{i}.{name}", shape) for i in range(12)
                for name, shape in (("qkv", (576, 192)), ("proj", (192, 192)),
                                    ("fc1", (768, 192)), ("fc2", (192, 768)))]
             + [("head", (1000, 192))])


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic_posterior(seed: int = 0) -> pqnet.Posterior:
    """Means ~ N(0, 0.02^2) (a trained ViT's scale); scales log-uniform in [1e-3, 5e-2], the
    range PWFN's regulariser leaves them in. The module holds the layers, not a forward."""
    gen = torch.Generator().manual_seed(seed)
    module = nn.Module()
    loc, scale, layers = {}, {}, {}
    for path, shape in DEIT_TINY:
        owner = module
        *parents, leaf = path.split(".")
        for part in parents:
            if not hasattr(owner, part):
                owner.add_module(part, nn.Module())
            owner = getattr(owner, part)
        w = 0.02 * torch.randn(shape, generator=gen)
        layer = (nn.Conv2d(shape[1], shape[0], shape[2:], stride=shape[2:], bias=False)
                 if len(shape) == 4 else nn.Linear(shape[1], shape[0], bias=False))
        layer.weight.data.copy_(w)
        owner.add_module(leaf, layer)
        loc[f"{path}.weight"] = w
        scale[f"{path}.weight"] = 10 ** (-3 + math.log10(50) * torch.rand(shape, generator=gen))
        kind = "Conv2d" if len(shape) == 4 else "Linear"
        layers[path] = LayerInfo(path, kind, shape, math.prod(shape[1:]), False)
    return pqnet.Posterior(loc, scale, layers, module)


def dense_fix(fixer: WeightFixer, mu: torch.Tensor, sigma: torch.Tensor, count: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """:meth:`WeightFixer.fix` on the dense matrix of distances (the reference)."""
    fixer._cover(mu)
    remaining = torch.arange(len(mu))
    taken_index, taken_value = [], []
    while count > 0:
        distance = (mu[remaining, None] - fixer.centres[None, :]).abs() / sigma[remaining, None]
        reach = distance <= fixer.threshold
        coverage = reach.sum(0)
        if int(coverage.max()) == 0:
            fixer._loosen()
            continue
        tied = (coverage == coverage.max()).nonzero().squeeze(1)  # closest in total wins,
        summed = ((mu[remaining, None].double() - fixer.centres[tied].double()).abs()
                  / sigma[remaining, None].double() * reach[:, tied]).sum(0)
        tied = tied[summed - summed.min() <= TIE_TOLERANCE * (1 + summed.min())]
        best = int(tied[fixer.centres[tied].abs().argmin()])  # then the smallest |c|
        candidates = reach[:, best].nonzero().squeeze(1)
        if len(candidates) > count:
            candidates = candidates[distance[candidates, best].argsort(stable=True)[:count]]
        taken_index.append(remaining[candidates])
        taken_value.append(fixer.centres[best].expand(len(candidates)))
        count -= len(candidates)
        keep = torch.ones(len(remaining), dtype=torch.bool)
        keep[candidates] = False
        remaining = remaining[keep]
    return torch.cat(taken_index), torch.cat(taken_value)


def all_rounds(fix, mu: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Every round of PWFN's schedule with ``fix``; the value of each weight, and seconds."""
    fixer = WeightFixer()
    values = torch.full_like(mu, float("nan"))
    free = torch.arange(len(mu))
    start = time.perf_counter()
    for fraction in SCHEDULE:
        count = math.ceil(fraction * len(mu) - 1e-9) - (len(mu) - len(free))
        index, value = fix(fixer, mu[free], sigma[free], count)
        values[free[index]] = value
        keep = torch.ones(len(free), dtype=torch.bool)
        keep[index] = False
        free = free[keep]
    return values, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subset", type=int, default=100_000)
    parser.add_argument("--json", default="benchmarks/pwfn_scale.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    posterior = synthetic_posterior()
    mu = torch.cat([v.flatten() for v in posterior.loc.values()])
    sigma = torch.cat([v.flatten() for v in posterior.scale.values()])
    print(f"synthetic DeiT-Tiny posterior: {len(mu):,} weights in {len(posterior.layers)} layers")

    pick = torch.randperm(len(mu), generator=torch.Generator().manual_seed(1))[:args.subset]
    ours_subset, ours_subset_s = all_rounds(WeightFixer.fix, mu[pick], sigma[pick])
    dense_subset, dense_subset_s = all_rounds(dense_fix, mu[pick], sigma[pick])
    same = torch.equal(ours_subset, dense_subset)
    print(f"{args.subset:,} weights, 10 rounds: pqnet {ours_subset_s:.2f} s, dense "
          f"{dense_subset_s:.2f} s ({dense_subset_s / ours_subset_s:.1f}x); same: {same}")

    before = peak_mib()
    _, assign_s = all_rounds(WeightFixer.fix, mu, sigma)
    assign_mib = peak_mib() - before
    print(f"{len(mu):,} weights, 10 rounds of assignment: {assign_s:.2f} s, "
          f"peak +{assign_mib:.0f} MiB")
    start = time.perf_counter()
    qnet = pqnet.quantize(posterior, "pwfn", retrain_epochs=0)
    end_to_end_s = time.perf_counter() - start
    print(f"pqnet.quantize(..., 'pwfn', retrain_epochs=0) end to end: {end_to_end_s:.2f} s, "
          f"{qnet.unique_values} unique values, value entropy {qnet.value_entropy_bits:.2f} bits, "
          f"process peak {peak_mib():.0f} MiB")
    result = {"weights": len(mu), "subset": args.subset, "same_assignment_on_subset": same,
              "subset_seconds": {"pqnet": ours_subset_s, "dense": dense_subset_s},
              "speedup_on_subset": dense_subset_s / ours_subset_s,
              "assignment_seconds": assign_s, "assignment_peak_mib": assign_mib,
              "end_to_end_seconds": end_to_end_s, "process_peak_mib": peak_mib(),
              "unique_values": qnet.unique_values, "value_entropy_bits": qnet.value_entropy_bits,
              "torch_threads": torch.get_num_threads()}
    save_json(result, args.json)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
