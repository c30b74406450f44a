"""Probabilistic Weight Fixing (Subia-Waud & Dasmahapatra, NeurIPS 2023).

Weight sharing decided by each weight's uncertainty: rounds of fixing weights to a small
set of power-of-two centres, the free weights retrained between rounds, until every weight
is fixed and the whole network uses a few dozen distinct values.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .. import _checks
from ..bnn import PWFNPrior, bayesian
from ..bnn.guide import softplus_inverse
from ..inference.checkpoint import load_checkpoint, save_checkpoint
from ..inference.fit import fit
from ..inference.posterior import Posterior
from .budget import layer_posteriors
from .qnet import QuantizedLayer, QuantizedNet, weight_name

SCHEDULE = (0.2, 0.4, 0.6, 0.7, 0.8, 0.9, 0.95, 0.975, 0.99, 1.0)
"""PWFN's cumulative fractions of fixed weights after each round."""
SMALLEST_EXPONENT = -7
TIE_TOLERANCE = 1e-6
"""Summed distances (in sds) this close, relatively and absolutely, count as tied: above the
float64 rounding of their difference arrays, far below any difference that matters."""
CHECKPOINT_KIND = "pwfn"


def centres(order: int, largest_exponent: int = 0,
            smallest_exponent: int = SMALLEST_EXPONENT) -> torch.Tensor:
    """PWFN's candidate values, ascending: zero and every signed sum of at most ``order``
    distinct powers of two ``2^e``, ``smallest_exponent <= e <= largest_exponent``,

    .. math:: \\mathcal C_o = \\{0\\} \\cup \\Big\\{\\sum_{k=1}^{j} s_k 2^{e_k} :
        1 \\le j \\le o,\\; s_k \\in \\{-1, 1\\},\\; e_1 > \\dots > e_j\\Big\\}.

    Every such value is a multiple of ``2^smallest_exponent`` below ``2^(largest_exponent+1)``
    in magnitude, so float32 holds it exactly.
    """
    order = _checks.int_in("max_order", order, 1, 4)
    exponents = range(smallest_exponent, largest_exponent + 1)
    values = {0.0}
    for j in range(1, order + 1):
        for chosen in itertools.combinations(exponents, j):
            for signs in itertools.product((-1.0, 1.0), repeat=j):
                values.add(sum(s * 2.0**e for s, e in zip(signs, chosen, strict=True)))
    return torch.tensor(sorted(values), dtype=torch.float32)


@dataclass(frozen=True)
class _Free:
    """The free weights: their positions, and the centres each one reaches, ``[lo, hi)``."""

    index: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor

    def select(self, keep: torch.Tensor) -> _Free:
        return _Free(self.index[keep], self.lo[keep], self.hi[keep])


@dataclass
class WeightFixer:
    """The assignment step of PWFN: greedy weight fixing by distance in posterior sds.

    A free weight ``i`` can be fixed to centre ``c`` when ``|mu_i - c| / sigma_i <=
    threshold``. :meth:`fix` repeatedly takes the centre that can take the most free
    weights, fixes them closest first until the requested number is reached, and updates
    the counts; when no centre can take any weight it raises ``order`` (more centres,
    :func:`centres`) up to ``max_order``, then multiplies ``threshold`` by ``widen``. The
    centres reach ``2^largest_exponent``, raised whenever a free mean lies beyond it (a
    mean that retraining moved out of range would otherwise widen the threshold for every
    later round). The order, threshold and exponent only grow, across calls too: a later
    round never uses a tighter rule than an earlier one.

    Ties: among centres that reach equally many free weights, the one whose reached weights
    are closest in total, ``sum_i |mu_i - c| / sigma_i`` (all of them, also when fewer are
    taken), wins, so a lone weight goes to its nearest centre; of centres equally close
    up to rounding, the smallest ``|c|``. The rule is symmetric in sign except for a tie
    between ``c`` and ``-c`` themselves.

    The centres a weight can reach form a contiguous run of the sorted centres, found by
    binary searches, so counting every centre's reach is a difference array: one pass over
    the free weights, ``O(n log C)``, for ``n`` weights and ``C`` centres, instead of the
    ``n x C`` distance matrix. The summed distances are difference arrays too, split where
    the centres pass ``mu_i``: on each side ``|mu_i - c|`` is linear in ``c``.
    """

    max_order: int = 4
    threshold: float = 1.0
    widen: float = 2.0
    largest_exponent: int = 0
    order: int = 1

    def __post_init__(self) -> None:
        self.centres = centres(self.order, self.largest_exponent)

    def _cover(self, mu: torch.Tensor) -> None:
        """Raise ``largest_exponent`` to ``ceil(log2 max |mu|)`` if the centres fall short."""
        largest = float(mu.abs().max()) if len(mu) else 0.0
        if largest > 2.0**self.largest_exponent:
            self.largest_exponent = math.ceil(math.log2(largest))
            self.centres = centres(self.order, self.largest_exponent)

    def _free(self, index: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> _Free:
        radius = self.threshold * sigma[index]
        return _Free(index, torch.searchsorted(self.centres, mu[index] - radius),
                     torch.searchsorted(self.centres, mu[index] + radius, right=True))

    def _coverage(self, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """For each centre, the number of weights whose ``[lo, hi)`` holds it."""
        size = len(self.centres) + 1
        starts = torch.bincount(lo, minlength=size) - torch.bincount(hi, minlength=size)
        return starts.cumsum(0)[:-1]

    def _distance(self, mu: torch.Tensor, sigma: torch.Tensor, lo: torch.Tensor,
                  hi: torch.Tensor) -> torch.Tensor:
        """For each centre ``c``, ``sum_i |mu_i - c| / sigma_i`` over the weights that reach
        it, in float64: ``+(mu_i - c) / sigma_i`` for ``c`` in ``[lo_i, mid_i)``, below
        ``mu_i``, and ``-(mu_i - c) / sigma_i`` in ``[mid_i, hi_i)``."""
        mid, size = torch.searchsorted(self.centres, mu), len(self.centres) + 1

        def signed(w: torch.Tensor) -> torch.Tensor:  # +w over [lo, mid), -w over [mid, hi)
            return (torch.bincount(lo, w, minlength=size)
                    - 2 * torch.bincount(mid, w, minlength=size)
                    + torch.bincount(hi, w, minlength=size)).cumsum(0)[:-1]

        inverse = sigma.double().reciprocal()
        return signed(mu.double() * inverse) - self.centres.double() * signed(inverse)

    def _best(self, coverage: torch.Tensor, free: _Free, mu: torch.Tensor,
              sigma: torch.Tensor) -> int:
        """The centre reaching the most free weights, ties broken as the class says (the
        distances are summed only when there is a tie: rare while many weights are free)."""
        tied = (coverage == coverage.max()).nonzero().squeeze(1)
        if len(tied) > 1:
            distance = self._distance(mu[free.index], sigma[free.index], free.lo, free.hi)[tied]
            closest = float(distance.min())
            tied = tied[distance <= closest + TIE_TOLERANCE * (1 + closest)]
        return int(tied[self.centres[tied].abs().argmin()])

    def _loosen(self) -> None:
        if self.order < self.max_order:
            self.order += 1
            self.centres = centres(self.order, self.largest_exponent)
        else:
            self.threshold *= self.widen

    def fix(self, mu: torch.Tensor, sigma: torch.Tensor, count: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Choose ``count`` of the free weights ``(mu, sigma)`` (1-d) and their centres.

        Returns ``(index, value)``: positions into ``mu`` and the centre each is fixed to,
        in the order they were taken.
        """
        if not 0 <= count <= len(mu):
            raise ValueError(f"count: expected 0..{len(mu)}, got {count}")
        if not bool(torch.isfinite(mu).all() & torch.isfinite(sigma).all() & (sigma > 0).all()):
            raise ValueError("mu, sigma: expected finite means and positive, finite sds")
        self._cover(mu)
        free = self._free(torch.arange(len(mu)), mu, sigma)
        coverage = self._coverage(free.lo, free.hi)
        taken_index, taken_value = [], []
        while count > 0:
            if int(coverage.max()) == 0:
                self._loosen()
                free = self._free(free.index, mu, sigma)
                coverage = self._coverage(free.lo, free.hi)
                continue
            best = self._best(coverage, free, mu, sigma)
            candidates = ((free.lo <= best) & (best < free.hi)).nonzero().squeeze(1)
            centre = self.centres[best]
            if len(candidates) > count:  # closest first
                taken = free.index[candidates]
                distance = (mu[taken] - centre).abs() / sigma[taken]
                candidates = candidates[distance.argsort(stable=True)[:count]]
            taken_index.append(free.index[candidates])
            taken_value.append(centre.expand(len(candidates)))
            count -= len(candidates)
            coverage -= self._coverage(free.lo[candidates], free.hi[candidates])
            keep = torch.ones(len(free.index), dtype=torch.bool)
            keep[candidates] = False
            free = free.select(keep)
        if not taken_index:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0)
        return torch.cat(taken_index), torch.cat(taken_value)

    def state(self) -> dict:
        return {"order": self.order, "threshold": self.threshold,
                "largest_exponent": self.largest_exponent}


def check_schedule(schedule: object) -> tuple[float, ...]:
    """A strictly increasing sequence of fractions in ``(0, 1]`` that ends at 1."""
    if isinstance(schedule, (str, bytes)) or not isinstance(schedule, Sequence) or not schedule:
        raise ValueError(f"schedule: expected a non-empty sequence of fractions, got {schedule!r}")
    if not all(isinstance(f, Real) and not isinstance(f, bool) and 0 < f <= 1 for f in schedule):
        raise ValueError(f"schedule: every fraction must lie in (0, 1], got {list(schedule)}")
    if any(b <= a for a, b in itertools.pairwise(schedule)):
        raise ValueError(f"schedule: fractions must increase strictly, got {list(schedule)}")
    if schedule[-1] != 1:
        raise ValueError(f"schedule: must end at 1 (every weight fixed), got {list(schedule)}")
    return tuple(float(f) for f in schedule)


def _bnn_from(posterior: Posterior, cap: float):
    """A BNN whose guide starts at ``posterior`` and whose prior is PWFN's, anchored at the
    posterior means with scale ``cap``."""
    likelihood = posterior.likelihood
    bnn = bayesian(posterior.mean_module(), prior=PWFNPrior(cap),
                   likelihood=likelihood.get("kind", "categorical"),
                   noise=likelihood.get("noise", 1.0),
                   bias=any(info.bias for info in posterior.layers.values()), init_scale=1.0)
    with torch.no_grad():
        for site in bnn.sites:
            name = site.removeprefix("net.")
            bnn.guide.loc_of(site).copy_(posterior.loc[name])
            bnn.guide.rho[site.replace(".", "/")].copy_(softplus_inverse(posterior.scale[name]))
    return bnn


def _site(layer: str) -> str:
    return f"net.{weight_name(layer)}"


def pwfn(posterior: Posterior, *, data: Dataset | None = None, seed: int = 0,
         schedule: Sequence[float] = SCHEDULE, max_order: int = 4, threshold: float = 1.0,
         widen: float = 2.0, zero_below: float | None = None, retrain_epochs: int = 1,
         lr: float = 1e-3, scale_lr: float | None = None, batch_size: int = 64,
         kl_weight: float = 1.0,
         sigma_cap: float = 0.05, device: str | torch.device = "cpu",
         checkpoint_dir: str | Path | None = None, resume: bool = False,
         progress: bool = False) -> QuantizedNet:
    """Probabilistic Weight Fixing (Subia-Waud & Dasmahapatra, NeurIPS 2023).

    For each cumulative fraction ``f_r`` of ``schedule`` (PWFN's .2, .4, .6, .7, .8, .9, .95,
    .975, .99, 1), round ``r`` fixes free weights until ``ceil(f_r N)`` of the network's
    ``N`` conv/linear weights are fixed:

    1. each free weight's distance to a centre ``c`` is ``|mu_i - c| / sigma_i``, in its own
       posterior standard deviations, with centres the signed sums of up to ``order``
       powers of two down to ``2^-7``, and zero (:func:`centres`);
    2. greedily, the centre within ``threshold`` of the most free weights takes them,
       closest first, until the round's count is reached (of centres that reach equally
       many, the one closest to them in summed sds, then the smallest); when no centre is
       within reach of any free weight, the order rises (up to ``max_order``), then the
       threshold widens by ``widen``; the centres grow to the largest free mean
       (:class:`WeightFixer`);
    3. fixed weights keep their value and get no more gradient (:meth:`pqnet.BNN.fix`);
       the free ones are retrained for ``retrain_epochs`` epochs by :func:`pqnet.fit`
       under PWFN's prior ``N(mu_0, sigma_cap^2)`` (:class:`~pqnet.bnn.priors.PWFNPrior`),
       whose KL is the regulariser that pushes each sigma up toward ``sigma_cap``, at
       strength ``kl_weight`` (``lr``, ``scale_lr``, ``batch_size``, ``device`` as in
       :func:`pqnet.fit`, seeded ``seed + r``). There is no retraining after the last round.

    A large sigma means the loss does not care where the weight sits, so it can join the
    most popular centre; a small sigma keeps it at a centre right beside its mean. Start
    from a posterior fitted with ``pqnet.bayesian(pretrained, prior="pwfn",
    init_scale="pwfn")`` for PWFN's own pipeline; any pqnet posterior works.

    ``zero_below``: before the first round, weights with ``|mu| < zero_below`` are fixed to
    zero (they count toward the first round and may exceed its fraction).

    Result: a :class:`QuantizedNet` whose weights all lie in one network-wide codebook.
    Each layer stores the part of it that it uses, with ``ceil(log2 n_l)`` bits per code
    for ``n_l`` values used in the layer (at least 1), so ``avg_bits`` is the fixed-width
    cost; the file codes them with an entropy coder (``size_bytes``, ``code_entropy_bits``);
    ``value_entropy_bits`` is the entropy of the pooled values, the figure the PWFN paper
    reports, and ``unique_values`` the size of the network-wide codebook. Biases and other
    parameters stay float32;
    ``config["rounds"]`` records each round (fixed fraction, order, threshold, values).

    ``checkpoint_dir``: the state after every round is written there atomically
    (``pwfn.pt``, a :mod:`pqnet.inference.checkpoint` of kind ``"pwfn"``); with
    ``resume=True`` a run with the same posterior and options goes on from the last
    completed round and ends with the same result. Without ``resume`` an existing
    checkpoint is an error, never overwritten.
    """
    seed = _checks.seed(seed)
    schedule = check_schedule(schedule)
    max_order = _checks.int_in("max_order", max_order, 1, 4)
    threshold = _checks.above("threshold", threshold, 0.0)
    widen = _checks.above("widen", widen, 1.0)
    zero_below = None if zero_below is None else _checks.above("zero_below", zero_below, 0.0)
    retrain_epochs = _checks.int_in("retrain_epochs", retrain_epochs, 0, 10_000)
    sigma_cap = _checks.above("sigma_cap", sigma_cap, 0.0)
    lr, kl_weight = _checks.above("lr", lr, 0.0), _checks.above("kl_weight", kl_weight, 0.0)
    scale_lr = None if scale_lr is None else _checks.above("scale_lr", scale_lr, 0.0)
    batch_size = _checks.int_in("batch_size", batch_size, 1, 1 << 30)
    resume = _checks.flag("resume", resume)
    device = _checks.device(device)
    checkpoint = Path(checkpoint_dir) / "pwfn.pt" if checkpoint_dir is not None else None
    if resume and checkpoint is None:
        raise ValueError("resume: needs checkpoint_dir, the folder to resume from")
    if not resume and checkpoint is not None and checkpoint.exists():
        raise ValueError(f"checkpoint_dir: {checkpoint_dir} already holds a PWFN checkpoint; "
                         "pass resume=True to continue it, or use another folder")
    state = load_checkpoint(checkpoint, CHECKPOINT_KIND, "checkpoint_dir") if resume else None
    layers = layer_posteriors(posterior)
    for layer, _, sigma in layers:
        if not bool((sigma > 0).all() & torch.isfinite(sigma).all()):
            raise ValueError(f"posterior: the scales of {weight_name(layer)} must be positive "
                             "and finite")
    if retrain_epochs and len(schedule) > 1 and data is None:
        raise ValueError("data: PWFN retrains between rounds; pass the training data "
                         "(or retrain_epochs=0)")
    options = dict(schedule=list(schedule), max_order=max_order, threshold=threshold,
                   widen=widen, zero_below=zero_below, retrain_epochs=retrain_epochs, lr=lr,
                   scale_lr=scale_lr, batch_size=batch_size, kl_weight=kl_weight,
                   sigma_cap=sigma_cap, seed=seed)

    bnn = _bnn_from(posterior, sigma_cap)
    fixer = WeightFixer(max_order, threshold, widen)
    total = sum(mu.numel() for _, mu, _ in layers)
    masks = {layer: torch.zeros(mu.shape, dtype=torch.bool) for layer, mu, _ in layers}
    values = {layer: torch.zeros(mu.shape) for layer, mu, _ in layers}
    rounds: list[dict] = []
    if state is not None:
        if state["options"] != options or state["posterior"] != _fingerprint(posterior):
            raise ValueError(f"resume: {checkpoint} is from another posterior or other options")
        masks, values, rounds = state["masks"], state["values"], state["rounds"]
        for layer in masks:
            bnn.fix(_site(layer), masks[layer], values[layer])
        bnn.load_state_dict(state["bnn"])
        fixer = WeightFixer(max_order, widen=widen, **state["fixer"])  # the rule reached

    for r in range(len(rounds), len(schedule)):
        start = time.perf_counter()
        if r == 0 and zero_below is not None:
            for layer in masks:
                masks[layer] |= bnn.guide.loc_of(_site(layer)).detach().cpu().abs() < zero_below
        _fix_round(fixer, bnn, masks, values, math.ceil(schedule[r] * total - 1e-9))
        record = {"round": r + 1, "target": schedule[r],
                  "fixed": sum(int(m.sum()) for m in masks.values()) / total,
                  "order": fixer.order, "threshold": fixer.threshold,
                  "unique_values": len(torch.cat([values[la][masks[la]] for la in masks])
                                       .unique())}
        if r < len(schedule) - 1 and retrain_epochs:
            fitted = fit(bnn, data, epochs=retrain_epochs, batch_size=batch_size, lr=lr,
                         scale_lr=scale_lr, seed=seed + r, kl_weight=kl_weight, warm_start=0,
                         lr_schedule="constant", device=device, progress=progress)
            record["elbo"] = fitted.history[-1]["elbo"]
        record["seconds"] = time.perf_counter() - start
        rounds.append(record)
        if checkpoint is not None:
            save_checkpoint(checkpoint, CHECKPOINT_KIND, {
                "options": options, "posterior": _fingerprint(posterior), "masks": masks,
                "values": values, "rounds": rounds, "fixer": fixer.state(),
                "bnn": bnn.state_dict()})

    final = Posterior.from_bnn(bnn)
    quantized = {layer: _shared_codebook_layer(values[layer]) for layer in masks}
    return QuantizedNet(quantized, final.module, "pwfn", {**options, "rounds": rounds})


def _fix_round(fixer: WeightFixer, bnn, masks: dict[str, torch.Tensor],
               values: dict[str, torch.Tensor], target: int) -> None:
    """Fix free weights, network-wide, until ``target`` are fixed: ``fixer`` chooses among
    the free weights of every layer at once (one codebook for the network); ``masks``,
    ``values`` and ``bnn`` are updated in place."""
    with torch.no_grad():
        mu = {la: bnn.guide.loc_of(_site(la)).detach().cpu().flatten() for la in masks}
        sigma = {la: bnn.guide.scale_of(_site(la)).detach().cpu().flatten() for la in masks}
    free = {la: (~masks[la]).flatten().nonzero().squeeze(1) for la in masks}
    fixed = sum(int(m.sum()) for m in masks.values())
    flat_mu = torch.cat([mu[la][free[la]] for la in masks])
    flat_sigma = torch.cat([sigma[la][free[la]] for la in masks])
    index, value = fixer.fix(flat_mu, flat_sigma, max(0, min(len(flat_mu), target - fixed)))
    offset = 0
    for layer in masks:  # the flat choice, back into each layer
        n = len(free[layer])
        mine = (index >= offset) & (index < offset + n)
        positions = free[layer][index[mine] - offset]
        masks[layer].view(-1)[positions] = True
        values[layer].view(-1)[positions] = value[mine]
        offset += n
        bnn.fix(_site(layer), masks[layer], values[layer])


def _fingerprint(posterior: Posterior) -> list:
    """What identifies the starting posterior of a checkpoint: names, shapes and sums."""
    return [(k, tuple(v.shape), float(v.double().sum()), float(posterior.scale[k].double().sum()))
            for k, v in posterior.loc.items()]


def _shared_codebook_layer(values: torch.Tensor) -> QuantizedLayer:
    """A layer of fixed ``values``: its codebook the distinct values it uses, ascending."""
    levels = values.unique()
    if len(levels) > 256:
        raise ValueError(f"max_order: a layer uses {len(levels)} distinct values, more than "
                         "8-bit codes hold; lower max_order")
    width = max(1, math.ceil(math.log2(len(levels))))
    codes = torch.searchsorted(levels, values).to(torch.uint8)
    bits = torch.full(values.shape, width, dtype=torch.uint8)
    return QuantizedLayer(codes, bits, {width: levels.float().reshape(1, -1)})
