"""Figures of benchmark results, drawn from their JSON alone (no network is needed).

Figures are built on matplotlib's object API with the Agg canvas, so nothing depends on a
display or on pyplot's global state.

The posterior and quantization diagnostics at the end (:func:`sigma_plot`, :func:`bits_plot`,
:func:`reliability_plot`, :func:`zscore_plot`, :func:`codebook_plot`) take a Posterior, quantized
networks or the data of :mod:`pqnet.diagnostics.analysis`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.stats import norm

from .._io import atomic_write
from ..bnn.priors import Prior
from ..inference.posterior import Posterior
from ..quantize.qnet import QuantizedNet, weight_name
from .analysis import HDI_PROB, recorded_prior, z_scores

# the reference networks of a benchmark result: (key, legend label, colour)
REFERENCES = (("float", "BNN posterior predictive", "black"),
              ("float_mean", "BNN mean network", "tab:gray"),
              ("deterministic", "deterministic net", "tab:brown"))


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points ``(bits, accuracy)`` that no other point beats: none has fewer or equal
    bits and a higher or equal accuracy (duplicates kept once). Sorted by bits. BoTorch's
    :func:`~botorch.utils.multi_objective.pareto.is_non_dominated`, which maximises, on
    ``(-bits, accuracy)``."""
    from botorch.utils.multi_objective.pareto import is_non_dominated  # BoTorch loads slowly

    if not points:
        return []
    y = torch.tensor([(-bits, acc) for bits, acc in points], dtype=torch.float64)
    keep = is_non_dominated(y, deduplicate=True)
    return sorted({points[i] for i in torch.nonzero(keep).flatten().tolist()})


def pareto_plot(results: dict, zoom_pp: float = 5.0) -> Figure:
    """Test accuracy (%) against file bits per weight (``8 * size_bytes / weights``, every
    byte of the saved file, log scale): one line per quantization method,
    the Pareto front of all rows (dotted), and dashed horizontal lines for the float
    references (the BNN's posterior predictive, its mean network, the deterministic net).

    When some row lies more than ``zoom_pp`` percentage points below the lowest reference,
    a second panel zooms in on the band from there up, where the methods differ.

    ``results`` is what :func:`pqnet.bench.run_benchmark` returns or writes as JSON; only
    its ``rows`` (``method``, ``bits_per_weight``, ``accuracy``), the reference entries
    and ``model`` / ``data`` are read.
    """
    if not isinstance(results, dict) or not isinstance(results.get("rows"), list):
        raise ValueError("results: expected a benchmark result with a 'rows' list")
    methods: dict[str, list[tuple[float, float]]] = {}
    for row in results["rows"]:
        methods.setdefault(row["method"], []).append(
            (float(row["bits_per_weight"]), 100 * float(row["accuracy"])))
    for points in methods.values():
        points.sort()
    references = [(label, colour, 100 * float(results[key]["accuracy"]))
                  for key, label, colour in REFERENCES if "accuracy" in results.get(key, {})]
    points = [p for line in methods.values() for p in line]
    floor = min((acc for _, _, acc in references), default=None)
    zoom = floor is not None and any(acc < floor - zoom_pp for _, acc in points)

    fig = Figure(figsize=(11.5 if zoom else 7.5, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if zoom else 1, squeeze=False)[0]
    front = pareto_front(points)
    markers = "osD^v<>pP*Xh"
    for ax in axes:
        for i, (method, line) in enumerate(methods.items()):
            ax.plot(*zip(*line, strict=True), marker=markers[i % len(markers)], label=method)
        if len(front) > 1:
            ax.step(*zip(*front, strict=True), where="post", color="black", linestyle=":",
                    linewidth=1, alpha=0.6, label="Pareto front")
        for label, colour, acc in references:
            ax.axhline(acc, color=colour, linestyle="--", linewidth=1,
                       label=f"{label} ({acc:.2f} %)")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter("{x:g}")
        ax.set_xlabel("bits per weight: the file's length, all in (log scale)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    title = (f"{results.get('model', '?')} on {results.get('data', '?')}: accuracy of the "
             "loaded quantized networks")
    axes[0].set_title(title, fontsize="medium", loc="left")
    if zoom:
        top = max([acc for _, acc in points] + [acc for _, _, acc in references])
        axes[1].set_ylim(floor - zoom_pp, top + 0.1 * zoom_pp)
        axes[1].set_title(f"zoom: down to {zoom_pp:g} pp below the lowest reference",
                          fontsize="medium", loc="left")
    axes[-1].legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write ``fig`` to ``path`` atomically, in the format its suffix names (e.g. ``.png``)."""
    path = Path(path)
    fmt = path.suffix.lstrip(".") or "png"
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=dpi))


# --------------------------------------------------------------------------- posterior and
# quantization diagnostics (issue 4): each function returns a Figure; save it with save_figure


def _figure(panels: int, width: float = 4.2, height: float = 3.6, columns: int = 3) -> tuple:
    columns = min(columns, panels)
    rows = math.ceil(panels / columns)
    fig = Figure(figsize=(width * columns, height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False).reshape(-1)
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, axes[:panels]


def sigma_plot(posterior: Posterior, kind: str = "sigma", bins: int = 40,
               prior: str | float | Prior | None = None) -> Figure:
    """Per-layer distributions of the posterior standard deviations ``sigma_i`` (``kind=
    "sigma"``) or of the signal-to-noise ratios ``|mu_i| / sigma_i`` (``kind="snr"``) of the
    Linear/Conv weights, as densities over ``log10``: one line per layer. With
    ``kind="sigma"`` each layer's prior sd (:func:`~pqnet.diagnostics.analysis.
    recorded_prior`, or ``prior``) is a dashed vertical line in the layer's colour: a layer
    whose sds pile up at its line was not informed by the data.

    A weight with a low SNR is one the data barely pin down (Graves 2011, "Practical
    Variational Inference for Neural Networks", prunes by it; Blundell et al. 2015 too).
    """
    if kind not in ("sigma", "snr"):
        raise ValueError(f"kind: expected 'sigma' or 'snr', got {kind!r}")
    fig, (ax,) = _figure(1, width=6.5)
    used_prior, _ = recorded_prior(posterior, prior)
    for path, info in posterior.layers.items():
        name = weight_name(path)
        mu, sigma = posterior.loc[name].double(), posterior.scale[name].double()
        value = sigma if kind == "sigma" else mu.abs() / sigma
        *_, patches = ax.hist(value.clamp_min(1e-12).log10().reshape(-1).numpy(), bins=bins,
                              density=True, histtype="step", linewidth=1.5,
                              label=f"{path} ({mu.numel():,})")
        if kind == "sigma":
            ax.axvline(math.log10(used_prior.scale_for(info.fan_in)), linestyle="--",
                       linewidth=1, color=patches[0].get_edgecolor())
    ax.set_xlabel("log10 sigma" if kind == "sigma" else "log10 |mu| / sigma")
    ax.set_ylabel("density")
    ax.set_title("posterior sd per layer (dashed: prior sd)" if kind == "sigma" else
                 "signal-to-noise per layer",
                 fontsize="medium", loc="left")
    ax.legend(fontsize="small", title="layer (weights)", title_fontsize="small")
    ax.grid(alpha=0.3)
    return fig


def bits_plot(qnets: Mapping[str, QuantizedNet]) -> Figure:
    """Mean code width per layer of each quantized network: grouped bars, layers in
    network order, with each network's average bits in its legend entry."""
    if not qnets:
        raise ValueError("qnets: expected at least one quantized network")
    layers = list(dict.fromkeys(p for q in qnets.values() for p in q.layers))
    fig, (ax,) = _figure(1, width=max(6.0, 0.9 * len(layers) * (1 + 0.3 * len(qnets))))
    width = 0.8 / len(qnets)
    for i, (label, qnet) in enumerate(qnets.items()):
        bits = [qnet.layer_bits.get(p, math.nan) for p in layers]
        ax.bar(np.arange(len(layers)) + (i - (len(qnets) - 1) / 2) * width, bits, width,
               label=f"{label} ({qnet.avg_bits:.2f} avg)")
    ax.set_xticks(np.arange(len(layers)), layers)
    ax.set_xlabel("layer")
    ax.set_ylabel("mean bits per weight")
    ax.set_title("bit allocation per layer", fontsize="medium", loc="left")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3, axis="y")
    return fig


def reliability_plot(curves: Mapping[str, dict]) -> Figure:
    """Reliability diagrams: accuracy against confidence per bin for each network, from
    :func:`pqnet.diagnostics.analysis.reliability` (its ``confidence``, ``accuracy``,
    ``count`` and ``ece``); the diagonal is perfect calibration, a curve below it is
    overconfidence. The lower panel shows how many inputs fall in each bin."""
    if not curves:
        raise ValueError("curves: expected at least one reliability curve")
    fig = Figure(figsize=(6.5, 6.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax, counts = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": (3, 1)})
    ax.plot([0, 1], [0, 1], color="black", linestyle=":", linewidth=1, label="calibrated")
    for label, curve in curves.items():
        edges = np.asarray(curve["bin_edges"])
        conf, acc = np.asarray(curve["confidence"]), np.asarray(curve["accuracy"])
        used = np.isfinite(conf)
        line, = ax.plot(conf[used], acc[used], marker="o", markersize=3,
                        label=f"{label} (ECE {curve['ece']:.3f})")
        counts.stairs(curve["count"], edges, color=line.get_color())
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title("reliability diagram", fontsize="medium", loc="left")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    counts.set_xlabel("confidence (top predicted probability)")
    counts.set_ylabel("inputs")
    counts.set_yscale("log")
    counts.grid(alpha=0.3)
    return fig


def zscore_plot(posterior: Posterior, qnets: Mapping[str, QuantizedNet],
                clip: float = 6.0, bins: int = 60, prob: float = HDI_PROB) -> Figure:
    """Quantization errors in posterior standard deviations, ``z_i = (q(mu_i) - mu_i) /
    sigma_i`` (:func:`pqnet.diagnostics.analysis.z_scores`): one panel per quantized
    network, one density per layer, against the ``N(0, 1)`` of a posterior draw, with its
    ``prob`` HDI (``+-1.96`` for 95 %) shaded. Values beyond ``+-clip`` are counted in the
    edge bins and their share is given in the legend. A layer whose posterior sd sits at the
    prior sd looks ideal here whatever the quantization did (see
    :func:`~pqnet.diagnostics.analysis.prior_movement`)."""
    if not qnets:
        raise ValueError("qnets: expected at least one quantized network")
    fig, axes = _figure(len(qnets))
    grid = np.linspace(-clip, clip, 400)
    for ax, (label, qnet) in zip(axes, qnets.items(), strict=True):
        half = float(norm.ppf((1 + prob) / 2))
        ax.axvspan(-half, half, color="tab:green", alpha=0.08, label=f"{100 * prob:g} % HDI")
        ax.plot(grid, np.exp(-grid ** 2 / 2) / math.sqrt(2 * math.pi), color="black",
                linestyle="--", linewidth=1, label="N(0, 1)")
        for name, z in z_scores(posterior, qnet).items():
            z = z.reshape(-1).double().numpy()
            outside = float(np.mean(np.abs(z) > clip))
            ax.hist(np.clip(z, -clip, clip), bins=bins, range=(-clip, clip), density=True,
                    histtype="step", linewidth=1.2,
                    label=f"{name.removesuffix('.weight')}" + (
                        f" ({100 * outside:.0f} % beyond)" if outside >= 0.005 else ""))
        ax.set_title(f"{label}: {qnet.avg_bits:.2f} avg bits", fontsize="medium", loc="left")
        ax.set_xlabel("z = (quantized - mu) / sigma")
        ax.set_ylabel("density")
        ax.legend(fontsize="x-small")
        ax.grid(alpha=0.3)
    return fig


def codebook_plot(qnet: QuantizedNet, max_layers: int = 12) -> Figure:
    """Codebook (cluster) usage: for each quantized layer, how many weights take each
    distinct value, drawn as stems at the values, with the layer's widths and the number of
    values used in the title. Unused codebook entries cost storage and are visible as
    missing stems on a grid; a skewed usage is what entropy coding would exploit."""
    paths = list(qnet.layers)[:max_layers]
    fig, axes = _figure(len(paths))
    for ax, path in zip(axes, paths, strict=True):
        layer = qnet.layers[path]
        values, counts = layer.values().reshape(-1).unique(return_counts=True)
        ax.vlines(values.numpy(), 0, counts.numpy(), linewidth=1.5)
        ax.plot(values.numpy(), counts.numpy(), "o", markersize=3)
        widths = ",".join(map(str, layer.widths))
        ax.set_title(f"{path}: {len(values)} values, {widths} bit", fontsize="medium",
                     loc="left")
        ax.set_xlabel("weight value")
        ax.set_ylabel("weights")
        ax.grid(alpha=0.3)
    fig.suptitle(f"codebook usage: {qnet.method}, {qnet.avg_bits:.2f} avg bits",
                 fontsize="medium")
    return fig
