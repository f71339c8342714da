"""The app's pipeline: image loading, face detection and cropping, the batched predictor, video, and batch
analysis of files and folders (``python -m fer_models.analyze``)."""
from .errors import InputError, ModelLoadError
from .faces import DEFAULT_DETECTOR, DETECTORS, FaceBox, FaceDetector, crop_face, detect_faces, get_detector
from .images import MAX_IMAGE_PIXELS, MAX_WORKING_SIDE, ImageSource, LoadedImage, load_image
from .loading import (
    DEFAULT_CHECKPOINT_DIR, ENV_MODEL_REPO, ModelSource, hub_offline, hub_reachable, load_model_with_fallback,
)
from .predictor import DetectedFaces, FacePredictor, RawPredictions, get_predictor
from .results import BackboneVote, FacePrediction, ImageAnalysis, annotate, class_color, draw_boxes

__all__ = [
    "BackboneVote", "DEFAULT_CHECKPOINT_DIR", "DEFAULT_DETECTOR", "DETECTORS", "DetectedFaces", "ENV_MODEL_REPO",
    "FaceBox", "FaceDetector", "FacePrediction", "FacePredictor", "ImageAnalysis", "ImageSource", "InputError",
    "LoadedImage", "MAX_IMAGE_PIXELS", "MAX_WORKING_SIDE", "ModelLoadError", "ModelSource", "RawPredictions",
    "annotate", "class_color", "crop_face", "detect_faces", "draw_boxes", "get_detector", "get_predictor",
    "hub_offline", "hub_reachable", "load_image", "load_model_with_fallback",
]
