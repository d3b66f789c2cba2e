"""celluscan.evaluation: metrics, calibration, plots and ``celluscan evaluate``.

Modules: ``metrics`` (``compute_metrics``: micro/macro accuracy, per-class P/R/F1, macro-F1,
confusion matrix, ECE, lineage-group level), ``calibration`` (temperature scaling), ``plots``
(PNG curves, confusion matrices, reliability diagrams), ``report`` (metrics.json +
per_class.md + plots), ``progress`` (images/s and ETA) and ``cli``.
"""
