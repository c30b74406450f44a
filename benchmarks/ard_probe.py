"""A probe, not a feature: does an ARD prior make the default posterior sparse in 8 epochs?

Automatic relevance determination (MacKay 1994; as variational dropout, Kharitonov et al.
2018, "Variational Dropout via Empirical Bayes") gives each weight its own prior
``N(0, s_i^2)`` and sets ``s_i`` to its optimum ``s_i^2 = mu_i^2 + sigma_i^2``; the KL is
then ``sum_i 1/2 log(1 + mu_i^2 / sigma_i^2)``, which rewards weights whose posterior
cannot tell them from zero. pqnet's priors are fixed Normals, so this probe swaps the
BNN's closed-form KL for the ARD one (it assigns ``bnn.kl``) and fits with
``pqnet.fit``'s defaults otherwise, at fixed KL weights. The frontier's seed-0 float net
and validation split are the start; each posterior, and the default one (pqnet's Normal
prior, KL weight chosen on validation) beside them, is quantized to uniform 2 bits, pruned by
credible level or by fraction, fine-tuned 2 epochs, saved, and scored as loaded.

    python benchmarks/ard_probe.py --data-dir ../shared/data/mnist
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
from pathlib import Path

import torch
from frontier import float_start, reloaded_accuracy

import pqnet
from pqnet._io import save_json
from pqnet.diagnostics.table import format_table


def ard_kl(bnn):
    """``sum_i 1/2 log(1 + mu_i^2 / sigma_i^2)`` over the BNN's random sites."""
    def kl(locs=None, variances=None):
        total = torch.zeros(())
        for site in bnn.sites:
            loc = bnn.guide.loc_of(site) if locs is None else locs[site]
            var = bnn.guide.scale_of(site).square() if variances is None else variances[site]
            total = total + 0.5 * torch.log1p(loc.square() / var).sum()
        return total
    return kl


def quantized(posterior, kl_weight, fit_part, val, test, seed: int, folder: Path) -> list[dict]:
    """Uniform 2 bits, pruned by each rule, fine-tuned 2 epochs; saved and scored as loaded."""
    rows, mean_val = [], pqnet.evaluate(posterior.mean_module(), val)["accuracy"]
    for rule, value in (("prune", 0.9), ("prune", 0.95), ("prune_fraction", 0.9)):
        qnet = pqnet.quantize(posterior, "uniform", bits=2, data=fit_part, seed=seed,
                              finetune_epochs=2, **{rule: value})
        rows.append({"kl_weight": kl_weight, "fitted_kl_weight": posterior.config["kl_weight"],
                     "rule": f"{rule}={value}", "mean_val": mean_val,
                     "pruned": qnet.config["prune"]["fraction"],
                     **reloaded_accuracy(qnet, folder / "q.pqn", val, test)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default="../shared/data/mnist")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kl-weights", type=float, nargs="+", default=[1.0, 0.1, 0.01])
    parser.add_argument("--json", default="benchmarks/ard_probe.json")
    args = parser.parse_args()
    train, test = pqnet.data.load("mnist", root=args.data_dir)
    fit_part, val, float_net = float_start(args.seed, train)
    rows, load = [], os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for kl_weight in ["default", *args.kl_weights]:
            with torch.random.fork_rng():
                torch.manual_seed(args.seed)
                bnn = pqnet.bayesian(copy.deepcopy(float_net))
            if kl_weight != "default":  # the default: pqnet's Normal prior, KL weight "auto"
                bnn.kl = ard_kl(bnn)
            posterior = pqnet.fit(bnn, fit_part, epochs=8, seed=args.seed, progress=False,
                                  kl_weight="auto" if kl_weight == "default" else kl_weight)
            rows += quantized(posterior, kl_weight, fit_part, val, test, args.seed, Path(tmp))
            print(format_table(rows, list(rows[0])), flush=True)
    save_json({"config": vars(args), "load_before": load, "load_after": os.getloadavg(),
               "rows": rows}, args.json)


if __name__ == "__main__":
    main()
