"""celluscan.inference: the predictor (fast paths, uncertainty, unfamiliar score), attention
rollout explanations, ONNX export and the ``predict`` / ``export`` commands.

>>> from celluscan.inference import Predictor
>>> predictor = Predictor.from_model_dir("runs/x/model")       # doctest: +SKIP
>>> predictor.predict_images([img])[0].label                     # doctest: +SKIP
"""

from celluscan.inference.explain import attention_rollout, overlay_heatmap, rollout_heatmap
from celluscan.inference.ood import OODScorer, energy_score, mahalanobis_score
from celluscan.inference.predictor import (
    DEFAULT_MODEL_DIR,
    ModelNotFoundError,
    Prediction,
    Predictor,
)
from celluscan.inference.uncertainty import UncertaintyPolicy, assess_uncertainty

__all__ = [
    "Predictor",
    "Prediction",
    "ModelNotFoundError",
    "DEFAULT_MODEL_DIR",
    "UncertaintyPolicy",
    "assess_uncertainty",
    "mahalanobis_score",
    "energy_score",
    "OODScorer",
    "attention_rollout",
    "rollout_heatmap",
    "overlay_heatmap",
]
