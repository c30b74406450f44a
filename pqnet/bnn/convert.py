"""``bayesian(module)``: any ``nn.Module`` of Linear/Conv layers as a Pyro model with a guide."""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import asdict, dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroSample
from pyro.nn.module import to_pyro_module_
from torch import nn

from .guide import FIXED_SCALE, MeanFieldNormalGuide, initial_scale
from .layers import BAYESIAN_TYPES, LocalReparameterization, bayesian_class
from .likelihoods import make_likelihood
from .priors import Prior, make_prior


@dataclass(frozen=True)
class LayerInfo:
    """What a quantizer needs to know about one Bayesian layer."""

    name: str  # module path in the original network, e.g. "features.0"
    kind: str  # "Linear", "Conv2d", "Embedding", ...
    weight_shape: tuple[int, ...]
    fan_in: int
    bias: bool  # has a bias, and it is random

    def to_dict(self) -> dict:
        return {**asdict(self), "weight_shape": list(self.weight_shape)}

    @classmethod
    def from_dict(cls, d: dict) -> LayerInfo:
        return cls(**{**d, "weight_shape": tuple(d["weight_shape"])})

    @property
    def num_random(self) -> int:
        """Random entries: the weight's, and the bias's (one per output) when it is random."""
        return math.prod(self.weight_shape) + (self.weight_shape[0] if self.bias else 0)


def layer_lines(layers: dict[str, LayerInfo], extra: dict[str, str] | None = None) -> list[str]:
    """One aligned line per layer (name, kind, weight shape, random entries, ``extra``): the
    body of the short reprs of :class:`BNN` and :class:`~pqnet.inference.Posterior`."""
    extra = extra or {}
    rows = [(path or "(root)", info.kind, "x".join(map(str, info.weight_shape)),
             f"{info.num_random:,} random" + (" (bias too)" if info.bias else ""),
             extra.get(path, "")) for path, info in layers.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in rows]


def _prior_for(param: str):
    """A PyroSample prior reading the layer's prior buffers, so it follows ``.to(device)``."""

    def prior(layer: nn.Module) -> dist.Distribution:
        loc = getattr(layer, f"{param}_prior_loc")
        scale = getattr(layer, f"{param}_prior_scale")
        shape = layer.pqnet_shapes[param]
        return dist.Normal(loc, scale).expand(shape).to_event(len(shape))

    return prior


class BNN(PyroModule):
    """A Bayesian neural network: a Pyro model (``forward``) with its guide (``guide``).

    .. math::

        w \\sim p(w) = \\prod_i \\mathcal N(w_i \\mid m_i, s_{\\ell(i)}^2), \\qquad
        y_n \\mid x_n, w \\sim p(y_n \\mid f(x_n; w)), \\qquad
        q(w) = \\prod_i \\mathcal N(w_i \\mid \\mu_i, \\mathrm{softplus}(\\rho_i)^2).

    The prior means ``m_i`` are 0, or the starting weights for an anchored prior
    (``prior="pwfn"``). The data sit in a ``pyro.plate`` of size ``dataset_size``, so a minibatch's
    log-likelihood is scaled by ``N / B`` and the ELBO is that of the whole data set.
    Layers that are not Linear/Conv (BatchNorm, LayerNorm, ...) keep point estimates,
    learned as ordinary parameters. Build one with :func:`bayesian`.
    """

    def __init__(self, net: PyroModule, template: nn.Module, likelihood: PyroModule,
                 guide: MeanFieldNormalGuide, layers: dict[str, LayerInfo], prior: Prior,
                 local_reparam: bool) -> None:
        super().__init__()
        self.net = net
        self.likelihood = likelihood
        self.guide = guide
        self.layers = layers
        self.prior = prior
        self.local_reparam = local_reparam
        # the plain network the posterior is read back into; outside the module tree,
        # because it holds no state that is trained
        object.__setattr__(self, "template", template)
        # the guide always records its Normals; the model uses them only when local_reparam
        self._lrt = LocalReparameterization()
        guide.handler = self._lrt

    def __repr__(self) -> str:
        # nn.Module's repr prints every submodule and the guide's parameters: pages of it
        total = sum(info.num_random for info in self.layers.values())
        head = (f"BNN({len(self.layers)} random layers, {total:,} random weights, "
                f"likelihood={self.likelihood.describe()['kind']!r}, prior={self.prior!r}, "
                f"kl_weight={self.kl_weight:g}, local_reparam={self.local_reparam})")
        return "\n".join([head, *layer_lines(self.layers)])

    @property
    def sites(self) -> list[str]:
        """Pyro sample-site names of the random weights, e.g. ``net.features.0.weight``."""
        return self.guide.sites

    @property
    def kl_weight(self) -> float:
        return self.guide.kl_weight

    @kl_weight.setter
    def kl_weight(self, value: float) -> None:
        self.guide.kl_weight = float(value)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None,
                dataset_size: int | None = None) -> torch.Tensor:
        with (
            pyro.settings.context(module_local_params=True),
            self._lrt if self.local_reparam else contextlib.nullcontext(),
        ):
            f = self.net(x)
            size = len(x) if dataset_size is None else dataset_size
            with pyro.plate("data", size=size, subsample=torch.arange(len(x), device=x.device)):
                self.likelihood(f, y)
        return f

    def prior_distribution(self, site: str) -> dist.Distribution:
        layer, param = self.site_layer(site)
        return _prior_for(param)(layer)

    def fix(self, site: str, mask: torch.Tensor, value: torch.Tensor) -> None:
        """Fix the weights of ``site`` where ``mask`` to ``value`` (weight fixing, PWFN).

        A fixed weight is a point mass: the guide uses ``value`` with scale
        :data:`~pqnet.bnn.guide.FIXED_SCALE`, no gradient reaches its parameters, and its
        prior becomes the same distribution, so its KL term is exactly zero and a fit's KL
        and ELBO count the free weights alone. Fixing is cumulative: weights fixed before
        stay fixed (``mask`` must cover them). Every check comes before any change
        (:meth:`~pqnet.bnn.guide.MeanFieldNormalGuide.fix`): a refused call leaves the BNN
        as it was.
        """
        mask, value = self.guide.fix(site, mask, value)
        layer, param = self.site_layer(site)
        shape = layer.pqnet_shapes[param]
        for kind, fixed in (("loc", value), ("scale", FIXED_SCALE)):
            prior = getattr(layer, f"{param}_prior_{kind}").expand(shape)
            fixed = torch.as_tensor(fixed, dtype=prior.dtype, device=prior.device)
            setattr(layer, f"{param}_prior_{kind}",
                    torch.where(mask.to(prior.device), fixed, prior).detach())

    def site_layer(self, site: str) -> tuple[nn.Module, str]:
        """The Bayesian layer that holds ``site`` and the parameter's name in it (looked up
        once: the losses ask for every site at every step)."""
        cache = self.__dict__.setdefault("_site_layers", {})
        if site not in cache:
            module_path, _, param = site.removeprefix("net.").rpartition(".")
            cache[site] = (self.net.get_submodule(module_path), param)
        return cache[site]

    def prior_parameters(self, site: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The prior's mean and scale of ``site`` (scalars, or tensors of its shape)."""
        layer, param = self.site_layer(site)
        return getattr(layer, f"{param}_prior_loc"), getattr(layer, f"{param}_prior_scale")

    def kl(self, locs: dict[str, torch.Tensor] | None = None,
           variances: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``KL(q || p)`` in closed form, summed over all random weights (not scaled); the
        guide's current means and variances unless ``locs`` / ``variances`` (by site) are
        given."""
        total = torch.zeros((), device=next(iter(self.guide.loc.values())).device)
        for site in self.sites:
            loc = self.guide.loc_of(site) if locs is None else locs[site]
            var = self.guide.scale_of(site).square() if variances is None else variances[site]
            total = total + normal_kl(loc, var, *self.prior_parameters(site))
        return total


def normal_kl(loc: torch.Tensor, var: torch.Tensor, prior_loc: torch.Tensor,
              prior_scale: torch.Tensor) -> torch.Tensor:
    """``sum_i KL(N(mu_i, sigma_i^2) || N(m_i, s_i^2))`` in closed form, ``var = sigma^2``,

    .. math:: \\sum_i \\log\\frac{s_i}{\\sigma_i}
        + \\frac{\\sigma_i^2 + (\\mu_i - m_i)^2}{2 s_i^2} - \\frac12;

    under a layer's scalar prior scale the sums come before the division: a few passes over
    the weights a step. The sums are taken in float64, as the terms nearly cancel in a large
    layer. With one prior per weight each term is written so that it does not cancel, with
    ``r_i = sigma_i^2 / s_i^2``,

    .. math:: \\frac12\\big(r_i - 1 - \\log r_i\\big) + \\frac{(\\mu_i - m_i)^2}{2 s_i^2},

    in float32 and summed in float64: ``r_i - 1`` is exact near 1 and ``log r_i`` accurate to
    its last bit, so the term keeps its digits when ``sigma_i`` is near ``s_i``, and stays
    finite when ``sigma_i`` is far below it; as accurate as float64 terms at float32's cost
    (``benchmarks/kl_precision.py``). A fixed weight (:meth:`BNN.fix`) has ``sigma = s``
    and ``mu = m``: its term is exactly 0.
    """
    n, f64 = loc.numel(), torch.float64
    if prior_scale.dim() == 0:
        shift = torch.linalg.vector_norm(loc - prior_loc, dtype=f64).square()
        quadratic = (var.sum(dtype=f64) + shift) / (2 * prior_scale.double().square())
        log_ratio = n * prior_scale.double().log() - 0.5 * var.log().sum(dtype=f64)
        return (log_ratio + quadratic - n / 2).to(loc.dtype)
    prior_var = prior_scale.square()
    ratio = var / prior_var
    terms = 0.5 * (ratio - 1 - ratio.log()) + (loc - prior_loc).square() / (2 * prior_var)
    return terms.sum(dtype=f64).to(loc.dtype)


def bayesian(
    module: nn.Module,
    prior: str | float | Prior = "fan-in",
    likelihood: str = "categorical",
    *,
    init_scale: float | str = 1e-3,
    init_relative_scale: float = 0.1,
    bias: bool = True,
    embeddings: bool = False,
    local_reparam: bool = True,
    noise: float = 1.0,
    learn_noise: bool = True,
) -> BNN:
    """Turn ``module`` into a :class:`BNN`: its Linear/Conv weights become random.

    Parameters
    ----------
    module : nn.Module
        Any network of ``Linear`` and ``Conv1d/2d/3d`` layers (any stride, padding,
        dilation, groups, bias or not); other layers stay point estimates. Its current
        weights (e.g. pretrained) become the guide's initial means. It is not modified.
    prior : ``"fan-in"`` (default, ``N(0, 2 / fan_in)``), ``"normal"`` (``N(0, 1)``),
        ``"pwfn"`` (``N(w_0, 0.05^2)`` around ``module``'s weights ``w_0``: PWFN's
        sigma regulariser, see :class:`~pqnet.bnn.priors.PWFNPrior`), a positive float
        (``N(0, prior^2)``) or a :mod:`pqnet.bnn.priors` object.
    likelihood : ``"categorical"`` (outputs are logits) or ``"normal"`` (regression with
        ``noise``: its initial value, learned as a point estimate when ``learn_noise``
        (the default), else fixed).
    init_scale : a positive float (constant initial sigma), ``"relative"``
        (``init_relative_scale * |w|``) or ``"pwfn"`` (PWFN's rule, see
        :func:`pqnet.bnn.guide.pwfn_scale`).
    bias : whether biases are random too (else point estimates).
    embeddings : whether ``nn.Embedding`` tables are random too (sampled directly).
    local_reparam : sample pre-activations instead of weights during training
        (Kingma et al. 2015); the model is the same, the gradients less noisy.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    prior = make_prior(prior)
    lik = make_likelihood(likelihood, noise, learn_noise)
    template = copy.deepcopy(module).cpu()
    net = copy.deepcopy(template)
    to_pyro_module_(net)

    layers: dict[str, LayerInfo] = {}
    locs: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    random_types = BAYESIAN_TYPES + ((nn.Embedding,) if embeddings else ())
    for path, layer in list(net.named_modules()):
        if not isinstance(layer, random_types):
            continue
        base = next(c for c in random_types if isinstance(layer, c))
        layer.__class__ = bayesian_class(base)
        has_bias = getattr(layer, "bias", None) is not None
        params = ["weight"] + (["bias"] if bias and has_bias else [])
        fan_in = layer.weight[0].numel() if not isinstance(layer, nn.Embedding) else 1
        layer.bias_is_random = "bias" in params
        layer.pqnet_shapes = {}
        for param in params:
            value = getattr(layer, param).detach()
            site = ".".join(filter(None, ("net", path, param)))
            locs[site] = value
            scales[site] = initial_scale(value, init_scale, init_relative_scale)
            layer.pqnet_shapes[param] = value.shape
            layer.register_buffer(f"{param}_prior_loc",
                                  value.clone() if prior.anchored else torch.tensor(0.0))
            layer.register_buffer(f"{param}_prior_scale", torch.tensor(prior.scale_for(fan_in)))
            delattr(layer, param)
            setattr(layer, param, PyroSample(_prior_for(param)))
        kind = type(template.get_submodule(path)).__name__
        weight_shape = tuple(layer.pqnet_shapes["weight"])
        layers[path] = LayerInfo(path, kind, weight_shape, fan_in,
                                 "bias" in params)
    if not layers:
        raise ValueError(
            "module: found no Linear/Conv layers to make Bayesian "
            f"(got {type(module).__name__}); expected at least one of "
            + ", ".join(t.__name__ for t in BAYESIAN_TYPES)
        )
    guide = MeanFieldNormalGuide(locs, scales)
    return BNN(net, template, lik, guide, layers, prior, local_reparam)
