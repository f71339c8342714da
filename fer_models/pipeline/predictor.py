"""The image pipeline: RGB pixels -> faces -> aligned crops -> every backbone + fusion -> result objects.

One way through the code for the app, the batch CLI, the video pipeline, the protocol, benchmarks and tests alike:
:class:`FacePredictor` holds one loaded model and runs all faces of an image (or of a batch of images) in one
batched forward pass of its BatchNorm-folded copy; its method arguments mirror the app's inputs. Crops are
prepared once from the model's input spec; explanations come from an optional injected ``explainer``
(``explain.Explainer``; this package does not import it) run beside the prediction on the centre view of the
*same* tensor, for the class the prediction reports, and never replace a probability or an attention map.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from ..models.fold import prepare_for_inference
from ..models.geometry import attention_to_frame, member_geometries
from ..models.predict import class_index, forward_views
from ..models.preprocess import TENCROP_CENTER, prepare_faces
from .errors import InputError
from .faces import DEFAULT_DETECTOR, FaceBox, FaceDetector, crop_face, detect_faces, get_detector
from .images import ImageSource, load_image
from .loading import DEFAULT_CHECKPOINT_DIR, ENV_MODEL_REPO, ModelSource, load_model_with_fallback
from .results import BackboneVote, FacePrediction, ImageAnalysis, _probs_dict

log = logging.getLogger(__name__)

# Said when an image has no face and the whole-image fallback is off (worded for the app, where it is a tick box).
NO_FACE_NOTE = "No face found. Tick 'classify the whole image as one face' to classify it anyway."


@dataclass
class RawPredictions:
    probs: np.ndarray  # B x C fused probabilities (model.probabilities: the config's temperatures applied)
    member_probs: dict[str, np.ndarray]  # member -> B x C
    attention: dict[str, np.ndarray]  # "<member>/<layer>" -> B x input_size x input_size (centre view)


@dataclass
class DetectedFaces:
    """One image's faces before classification: what :meth:`FacePredictor.find_faces` hands to ``classify``."""

    rgb: np.ndarray
    boxes: list[FaceBox]
    crops: list[np.ndarray]  # one square RGB uint8 crop per box
    detector: str
    whole_image: bool  # no face was found and the whole image stands in as one
    notes: list[str]
    timings_ms: dict[str, float]


class FacePredictor:
    """A loaded FER model plus a face detector (and optionally an explainer), shared by all requests.

    ``explainer`` is any object with ``explain(x, method=..., target=...)`` returning ``heatmaps``
    (``{name: B x S x S}``), as ``explain.Explainer`` does (it is thread-safe, so calls are not serialised).
    """

    def __init__(
        self, model: torch.nn.Module, *, detector: Union[str, FaceDetector] = DEFAULT_DETECTOR,
        explainer: Any = None, source: Optional[ModelSource] = None, max_faces: int = 50,
        max_explained: int = 8, detect_max_side: int = 640, crop_px: Optional[int] = None,
    ):
        self.model = prepare_for_inference(model.eval())  # every prediction: a BatchNorm-folded, channels_last copy
        self.device = next(model.parameters()).device
        self.spec = model.input_spec()
        self.class_names: list[str] = list(model.class_names)
        self.backbones: list[str] = list(model.member_names)
        self.detector = detector
        self.explainer = explainer
        self.source = source or ModelSource("memory", model.arch, str(self.device), model.arch)
        self.max_faces, self.max_explained = max_faces, max_explained
        self.detect_max_side = detect_max_side
        # Detector crops are cut at 3x the model's input size, not at it: the same crop is the picture the app shows
        # and overlays heatmaps on, and preprocessing resamples it to input_size for the model (area averaging).
        self.crop_px = crop_px or 3 * int(self.spec["input_size"])
        self._geometry: dict[tuple, dict] = {}
        self._geometry_lock = threading.Lock()

    # --- building blocks ------------------------------------------------------------------------------------
    def get_detector(self, detector: Union[str, FaceDetector, None] = None) -> FaceDetector:
        d = detector or self.detector
        return get_detector(d) if isinstance(d, str) else d

    def prepare(self, crops: Sequence[np.ndarray], tta: bool = False) -> torch.Tensor:
        """Face crops -> the model's input per its spec: B x C x h x w, or 10 x B x ... with ten-crop."""
        return prepare_faces(list(crops), self.spec, tta="tencrop" if tta else "center").to(self.device)

    def _attention_geometry(self, crop_shape: tuple) -> dict:
        """Where each attention cell sits in the crop, probed once per crop shape (as the explainer's CAMs)."""
        with self._geometry_lock:
            if crop_shape not in self._geometry:
                self._geometry[crop_shape] = member_geometries(self.model, crop_shape, self.device)[1]
            return self._geometry[crop_shape]

    @torch.inference_mode()
    def predict(self, x: torch.Tensor) -> RawPredictions:
        """Probabilities and attention maps for prepared faces (:meth:`prepare`): the one prediction path."""
        out = forward_views(self.model, x, attention=True)
        probs, member_probs = self.model.probabilities(out)
        attention = attention_to_frame(out.attention, self._attention_geometry(tuple(x.shape[-3:])),
                                       tuple(x.shape[-2:]), self.spec["input_size"])
        return RawPredictions(probs.cpu().numpy(), {k: v.cpu().numpy() for k, v in member_probs.items()}, attention)

    def predict_crops(self, crops: Sequence[np.ndarray], tta: bool = False) -> RawPredictions:
        """Probabilities for face crops (uint8, any size), all in one batch; ten-crop averages 10 views' logits."""
        return self.predict(self.prepare(crops, tta))

    def class_index(self, target: Union[None, int, str]) -> Optional[int]:
        """None (the predicted class), a class index, or a class name -> index or None."""
        try:
            return class_index(target, self.class_names)
        except ValueError as e:
            raise InputError(f"{str(e)[0].upper()}{str(e)[1:]}.") from e

    def explain(self, x: torch.Tensor, raw: RawPredictions, rows: Sequence[int], method: Optional[str],
                target: Optional[int]):
        """The explainer's maps for faces ``rows`` of prepared faces ``x`` (their centre view), for ``target`` or
        else the class ``raw`` predicts for each: what is explained is what is reported."""
        if self.explainer is None:
            raise RuntimeError("this predictor has no explainer")
        centre = x[TENCROP_CENTER] if x.dim() == 5 else x
        rows = list(rows)
        kwargs: dict[str, Any] = {"target": raw.probs[rows].argmax(1) if target is None else target}
        if method:
            kwargs["method"] = method
        try:
            return self.explainer.explain(centre[rows], **kwargs)
        except ValueError as e:  # e.g. an unknown method name typed into the API
            raise InputError(f"Cannot compute the explanation: {e}") from e

    # --- whole images: find faces, then classify (and explain) the faces of one or many images at once ----
    def find_faces(
        self, rgb: np.ndarray, *, detector: Union[str, FaceDetector, None] = None, whole_image: bool = False,
        notes: Optional[list[str]] = None,
    ) -> DetectedFaces:
        """Detect the faces of an RGB uint8 image and crop them (at most ``max_faces``, the largest)."""
        notes = list(notes or [])
        det = self.get_detector(detector)
        t = time.perf_counter()
        h, w = rgb.shape[:2]
        boxes = detect_faces(rgb, det, max_side=self.detect_max_side) if min(h, w) >= 12 else []
        detect_ms = (time.perf_counter() - t) * 1000
        is_whole = False
        if not boxes and whole_image:
            boxes, is_whole = [FaceBox(0.0, 0.0, float(w), float(h), 1.0)], True
            notes.append("No face found: the whole image was classified as one face.")
        elif not boxes:
            notes.append(NO_FACE_NOTE)
        if len(boxes) > self.max_faces:
            notes.append(f"{len(boxes)} faces found; only the {self.max_faces} largest were analysed.")
            boxes = sorted(sorted(boxes, key=lambda b: -b.area)[: self.max_faces], key=lambda b: (b.x0, b.y0))
        margin = 0.0 if is_whole else det.crop_margin
        crops = [crop_face(rgb, b, margin=margin, size=self.crop_px) for b in boxes]
        return DetectedFaces(rgb, boxes, crops, det.name, is_whole, notes, {"detect": detect_ms})

    def classify(
        self, images: Sequence[DetectedFaces], *, tta: bool = False, explain: bool = False,
        cam_method: Optional[str] = None, cam_target: Union[None, int, str] = None,
        max_explained: Optional[int] = None,
    ) -> list[ImageAnalysis]:
        """One :class:`ImageAnalysis` per image: the crops of all ``images`` go through the model in one
        batched forward pass (and the explained ones through the explainer beside it, on the same prepared
        tensor). Timings of these shared stages are the whole batch's."""
        target_idx = self.class_index(cam_target)
        offsets = np.cumsum([0] + [len(d.crops) for d in images]).tolist()
        crops = [c for d in images for c in d.crops]
        explained: list[int] = []  # indices into `crops` of each image's `max_explained` largest faces
        if explain and self.explainer is not None:
            k = self.max_explained if max_explained is None else max_explained
            for d, o in zip(images, offsets):
                largest = sorted(range(len(d.boxes)), key=lambda j: -d.boxes[j].area)[:k]
                explained += sorted(o + j for j in largest)
        raw, exp, timings = None, None, {}
        if crops:
            raw, exp, timings = self._predict(crops, explained, tta, cam_method, target_idx)
        out = []
        for d, o, o1 in zip(images, offsets, offsets[1:]):
            faces = [self._face(d, j, raw, o + j) for j in range(len(d.boxes))]
            notes = list(d.notes)
            if exp is not None:
                rows = [(row, i - o) for row, i in enumerate(explained) if o <= i < o1]
                self._attach_explanations(faces, exp, rows, notes)
            t = {**d.timings_ms, **timings}
            t["total"] = sum(t.values())
            out.append(self._analysis(d, faces, tta, explain, cam_method, notes, t))
        return out

    def _predict(self, crops, explained, tta, cam_method, target_idx):
        """``(raw predictions of every crop, the explanation of the `explained` crops or None, timings)``: the
        crops are prepared once; the explainer only adds maps beside the prediction."""
        t = time.perf_counter()
        x = self.prepare(crops, tta)
        raw = self.predict(x)
        timings = {"classify": (time.perf_counter() - t) * 1000}
        exp = None
        if explained:
            t = time.perf_counter()
            exp = self.explain(x, raw, explained, cam_method, target_idx)
            timings["explain"] = (time.perf_counter() - t) * 1000
        return raw, exp, timings

    def _face(self, d: DetectedFaces, j: int, raw: RawPredictions, i: int) -> FacePrediction:
        """Face ``j`` of image ``d``, whose predictions are row ``i`` of ``raw``."""
        p = raw.probs[i]
        votes = [BackboneVote(name, self.class_names[int(mp.argmax())], float(mp.max()),
                              _probs_dict(self.class_names, mp))
                 for name, mp in ((name, raw.member_probs[name][i]) for name in self.backbones)]
        return FacePrediction(
            index=j + 1, box=d.boxes[j], label=self.class_names[int(p.argmax())], confidence=float(p.max()),
            probs=_probs_dict(self.class_names, p), votes=votes, crop=d.crops[j],
            attention={k: v[i] for k, v in raw.attention.items()}, whole_image=d.whole_image,
        )

    def _attach_explanations(self, faces: list[FacePrediction], exp, rows: list[tuple[int, int]],
                             notes: list[str]) -> None:
        """Give ``faces[j]`` row ``row`` of the explanation ``exp`` for each ``(row, j)``."""
        for row, j in rows:
            faces[j].heatmaps = {name: np.asarray(m[row], np.float32) for name, m in exp.heatmaps.items()}
            faces[j].cam_target = self.class_names[int(exp.targets[row])]
        if 0 < len(rows) < len(faces):
            numbers = ", ".join(f"#{faces[j].index}" for _, j in rows)
            notes.append(f"{len(faces)} faces: Grad-CAM computed for the {len(rows)} largest only ({numbers}).")

    def _analysis(self, d: DetectedFaces, faces, tta, explain, cam_method, notes, timings) -> ImageAnalysis:
        return ImageAnalysis(
            width=int(d.rgb.shape[1]), height=int(d.rgb.shape[0]), faces=faces, class_names=self.class_names,
            backbones=self.backbones, detector=d.detector, tta="tencrop" if tta else "center",
            model=self.source.location, cam_method=(cam_method or "default") if explain else None,
            notes=notes, timings_ms=timings,
        )

    def analyze_batch(
        self, images: Sequence[np.ndarray], *, detector: Union[str, FaceDetector, None] = None,
        whole_image: bool = False, notes: Optional[Sequence[Optional[list[str]]]] = None, **classify_kw,
    ) -> list[ImageAnalysis]:
        """Analyse RGB uint8 arrays: faces found image by image, then all their crops in one forward pass.
        ``classify_kw``: ``tta``, ``explain``, ``cam_method``, ``cam_target``, ``max_explained``."""
        notes = list(notes) if notes is not None else [None] * len(images)
        found = [self.find_faces(rgb, detector=detector, whole_image=whole_image, notes=n)
                 for rgb, n in zip(images, notes)]
        return self.classify(found, **classify_kw)

    def analyze_array(
        self, rgb: np.ndarray, *, detector: Union[str, FaceDetector, None] = None, tta: bool = False,
        whole_image: bool = False, explain: bool = False, cam_method: Optional[str] = None,
        cam_target: Union[None, int, str] = None, max_explained: Optional[int] = None,
        notes: Optional[list[str]] = None,
    ) -> ImageAnalysis:
        """Analyse an RGB uint8 array (see :meth:`analyze_image` for the arguments)."""
        return self.analyze_batch(
            [rgb], detector=detector, whole_image=whole_image, notes=[notes], tta=tta, explain=explain,
            cam_method=cam_method, cam_target=cam_target, max_explained=max_explained,
        )[0]

    def analyze_image(
        self, image: ImageSource, *, detector: Union[str, FaceDetector, None] = None, tta: bool = False,
        whole_image: bool = False, explain: bool = False, cam_method: Optional[str] = None,
        cam_target: Union[None, int, str] = None, max_explained: Optional[int] = None,
    ) -> tuple[ImageAnalysis, np.ndarray]:
        """``(analysis, rgb)`` for an image file, bytes, array or PIL image.

        detector: a key of ``faces.DETECTORS`` (e.g. ``"mtcnn"``, ``"blazeface"``) or a detector (default: the
        predictor's); tta: ten-crop (the mean of the ten views' logits);
        whole_image: classify the whole image as one face when no face is found; explain: Grad-CAM for up to
        ``max_explained`` faces (largest first) with ``cam_method`` and ``cam_target`` (None = predicted class).
        Boxes refer to the returned ``rgb`` (upright, downscaled to at most ``MAX_WORKING_SIDE``).
        """
        t = time.perf_counter()
        loaded = load_image(image)
        load_ms = (time.perf_counter() - t) * 1000
        analysis = self.analyze_batch(
            [loaded.pixels], detector=detector, whole_image=whole_image, notes=[loaded.notes], tta=tta,
            explain=explain, cam_method=cam_method, cam_target=cam_target, max_explained=max_explained,
        )[0]
        analysis.timings_ms = {"load": load_ms, **analysis.timings_ms}
        return analysis, loaded.pixels


_PREDICTORS: dict[tuple, FacePredictor] = {}
_PREDICTORS_LOCK = threading.Lock()


def get_predictor(
    repo_id: Optional[str] = None, local_dir: Union[str, Path] = DEFAULT_CHECKPOINT_DIR, *,
    device: Optional[str] = None, detector: str = DEFAULT_DETECTOR,
    make_explainer: Optional[Callable[[torch.nn.Module], Any]] = None,
) -> FacePredictor:
    """The process-wide predictor for these weights, loaded once (thread-safe) and shared by all requests."""
    key = (repo_id if repo_id is not None else os.environ.get(ENV_MODEL_REPO), str(local_dir), device, detector,
           make_explainer)
    with _PREDICTORS_LOCK:
        if key not in _PREDICTORS:
            model, source = load_model_with_fallback(repo_id, local_dir, device=device)
            explainer = make_explainer(model) if make_explainer is not None else None
            _PREDICTORS[key] = FacePredictor(model, detector=detector, explainer=explainer, source=source)
        return _PREDICTORS[key]
