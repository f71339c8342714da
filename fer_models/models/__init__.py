"""Model definitions: the registry, VGG19 / ResNet18 (+ CBAM attention) backbones, their fusion, the output
contract and config-carrying safetensors Hub I/O (``base``), spec-driven preprocessing and batched prediction.
Knows nothing of faces or UIs."""
from ._registry import create_model, is_model, list_models, register_model
from .base import FER2013_CLASSES, FERModel, ModelOutput, default_config, load_model, load_weights
from . import vgg, resnet, fusion  # noqa: F401  (register the architectures)
from .fusion import FusionModel

__all__ = [
    "FER2013_CLASSES", "FERModel", "FusionModel", "ModelOutput", "create_model", "default_config", "is_model",
    "list_models", "load_model", "load_weights", "register_model",
]
