"""Diagnostics of posteriors and quantized networks.

``metrics`` loads with pqnet. The ArviZ converter and model comparison (``arviz``), the
analysis of a quantized net against its posterior (``analysis``), the figures (``plots``) and
the run report (``report``) load on first use: they import ArviZ and matplotlib, and the
inference package, which itself imports ``metrics``.
"""

import importlib

from .metrics import classification_metrics, entropy, expected_calibration_error

# name -> submodule, imported on first access (PEP 562)
_LAZY = {
    **dict.fromkeys(["DEFAULT_CHAINS", "compare_networks", "held_out_log_density",
                     "pareto_k_table", "psis_loo", "to_inference_data"], "arviz"),
    **dict.fromkeys(["HDI_PROB", "DiagnosticWarning", "analyze", "bits_sigma_correlation",
                     "entropy_auroc", "hdi_coverage", "layer_table", "prediction_checks",
                     "predictive_divergence", "predictive_summary", "prior_movement",
                     "reliability", "z_scores"], "analysis"),
    **dict.fromkeys(["bits_plot", "codebook_plot", "pareto_plot", "reliability_plot",
                     "save_figure", "sigma_plot", "zscore_plot"], "plots"),
    "write_report": "report",
    "format_table": "table",
    "markdown_table": "table",
}

__all__ = ["classification_metrics", "entropy", "expected_calibration_error", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
