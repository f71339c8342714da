"""Explanations for FER models: CAMs of every backbone and of the fused decision, overlays, faithfulness.

    from explain import Explainer, DEFAULT_METHOD
    exp = Explainer(model).explain(prepare_faces(faces, model.input_spec()), method=DEFAULT_METHOD)

``explain`` imports ``fer_models`` and pytorch-grad-cam, never the app.
"""
from .cam import ALIGN, DEFAULT_METHOD, FUSION_COMBINE, METHODS, TARGET_FREE_METHODS, Explainer, Explanation

__all__ = [
    "ALIGN", "DEFAULT_METHOD", "FUSION_COMBINE", "METHODS", "TARGET_FREE_METHODS", "Explainer", "Explanation",
]
