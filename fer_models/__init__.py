"""FER models: VGG19, ResNet18 (+ CBAM attention) and their fusion, with config-carrying safetensors checkpoints.

Three layers, each a subpackage: ``models`` (definitions, preprocessing, Hub I/O), ``training`` (data, augmentation,
training, evaluation, cards, publishing) and ``pipeline`` (images -> faces -> crops -> predictions, video, batch
analysis). The model names load eagerly (torch only); the pipeline's names (OpenCV, Pillow) load on first use,
so ``import fer_models`` stays light.
"""
from importlib import import_module

from .models import (
    FER2013_CLASSES, FERModel, FusionModel, ModelOutput, create_model, default_config, is_model, list_models,
    load_model, load_weights, register_model,
)

_LAZY = {
    "FacePredictor": "pipeline", "ImageAnalysis": "pipeline", "FacePrediction": "pipeline",
    "BackboneVote": "pipeline", "InputError": "pipeline", "ModelLoadError": "pipeline", "load_image": "pipeline",
    "load_model_with_fallback": "pipeline", "get_predictor": "pipeline", "analyze_video": "pipeline.video",
}
# Submodules served as attributes: `fer_models.analyze` is the batch CLI module, callable as the analyze() function.
_LAZY_MODULES = {"analyze"}

__all__ = [
    "FER2013_CLASSES", "FERModel", "FusionModel", "ModelOutput", "create_model", "default_config", "is_model",
    "list_models", "load_model", "load_weights", "register_model", *_LAZY, *_LAZY_MODULES,
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    if name in _LAZY_MODULES:
        return import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
