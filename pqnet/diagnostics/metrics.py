"""Predictive metrics: accuracy, NLL, calibration (ECE), entropy and mutual information."""

from __future__ import annotations

import torch


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) over the last axis: ``H(p) = -sum_c p_c log p_c``."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1)


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor,
                               num_bins: int = 15) -> float:
    """ECE with equal-width confidence bins (Guo et al. 2017, "On Calibration of Modern
    Neural Networks"):

    .. math:: \\mathrm{ECE} = \\sum_b \\frac{|B_b|}{N}\\,|\\mathrm{acc}(B_b) - \\mathrm{conf}(B_b)|,

    where ``conf`` is the top predicted probability and bin ``b`` holds confidences in
    ``((b-1)/M, b/M]``.
    """
    confidence, predicted = probs.max(-1)
    correct = (predicted == labels).to(probs.dtype)
    # bin b holds (b/M, (b+1)/M]; confidence is at least 1/C > 0, so no sample is lost
    bins = (confidence * num_bins).ceil().long().clamp(1, num_bins) - 1
    gap = torch.zeros(num_bins, dtype=probs.dtype).index_add_(0, bins, correct - confidence)
    return float(gap.abs().sum() / len(labels))


def classification_metrics(mean_probs: torch.Tensor, labels: torch.Tensor,
                           mean_sample_entropy: torch.Tensor, num_bins: int = 15) -> dict:
    """Metrics of a (Bayesian) classifier from its posterior predictive.

    ``mean_probs`` is ``p(y | x, D) = E_q[p(y | x, w)]`` per example, and
    ``mean_sample_entropy`` is ``E_q[H(p(y | x, w))]``; their difference is the mutual
    information between the label and the weights, the epistemic part of the predictive
    entropy (Houlsby et al. 2011, "BALD").
    """
    total = entropy(mean_probs)
    picked = mean_probs.gather(-1, labels[:, None]).squeeze(-1)
    return {
        "accuracy": float((mean_probs.argmax(-1) == labels).double().mean()),
        "nll": float(-picked.clamp_min(1e-12).log().double().mean()),
        "ece": expected_calibration_error(mean_probs, labels, num_bins),
        "entropy": float(total.double().mean()),
        "mutual_information": float((total - mean_sample_entropy).clamp_min(0).double().mean()),
    }


def mcnemar(correct_a: torch.Tensor, correct_b: torch.Tensor) -> dict:
    """Exact McNemar test of two classifiers scored on the same examples.

    Only the discordant examples count: ``b`` where only A is right, ``c`` where only B is.
    Under the null of equal accuracy ``b ~ Binomial(b + c, 1/2)``; the two-sided p-value is
    ``min(1, 2 P(X <= min(b, c)))`` (McNemar 1947; exact form, Edwards 1948). Returns
    ``{"only_a", "only_b", "p_value"}``.
    """
    from scipy.stats import binom  # scikit-learn's dependency; imported where it is used

    a, b = correct_a.bool().reshape(-1), correct_b.bool().reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"correct_b: expected {tuple(a.shape)} like correct_a, got "
                         f"{tuple(b.shape)}")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n = only_a + only_b
    p = 1.0 if n == 0 else min(1.0, 2 * float(binom.cdf(min(only_a, only_b), n, 0.5)))
    return {"only_a": only_a, "only_b": only_b, "p_value": p}
