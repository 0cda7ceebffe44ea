"""Semantic Tube Prediction (STP): the trajectory-straightness auxiliary loss and its runtime policy.

- :mod:`amer.stp.triple`: the triple form, ``1 - cos(h[r] - h[s], h[t] - h[r])`` of sampled ordered
  positions (:func:`compute_stp_loss`, the public kernel);
- :mod:`amer.stp.span`: the span form, one patch against its complement (the STP paper's released code);
- :mod:`amer.stp.geometry`: the bend and the document masks both forms (and the curvature estimators in
  :mod:`amer.analysis.trajectory`) share;
- :mod:`amer.stp.policy`: which taps, which form, how strongly and from when (:class:`STPPolicy`).

The kernels are pure math; policy lives only in :class:`STPPolicy` and :class:`~amer.config.STPConfig`.
"""

from amer.stp.policy import STPPolicy
from amer.stp.span import sample_patches, span_stp_per_layer
from amer.stp.triple import compute_stp_loss, sample_spans, span_bends, stp_per_layer

__all__ = ["STPPolicy", "compute_stp_loss", "sample_patches", "sample_spans", "span_bends", "span_stp_per_layer",
           "stp_per_layer"]
