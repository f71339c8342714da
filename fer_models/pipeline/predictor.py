"""The image pipeline: RGB pixels -> faces -> aligned crops -> every backbone + fusion -> result objects.

One way through the code for the app, the batch CLI, the video pipeline, benchmarks and tests alike:
:class:`FacePredictor` holds one loaded model and runs all faces of an image (or of a batch of images) in one
batched forward pass; its method arguments mirror the app's inputs. Explanations come from an optional injected
``explainer`` (``explain.Explainer``; this package does not import it) computed from the *same* crops.
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

from ..models.preprocess import prepare_faces
from .errors import InputError
from .faces import DEFAULT_DETECTOR, FaceBox, FaceDetector, crop_face, detect_faces, get_detector
from .images import ImageSource, load_image
from .loading import DEFAULT_CHECKPOINT_DIR, ENV_MODEL_REPO, ModelSource, load_model_with_fallback
from .results import BackboneVote, FacePrediction, ImageAnalysis, _probs_dict

log = logging.getLogger(__name__)

# Said when an image has no face and the whole-image fallback is off (worded for the app, where it is a tick box).
NO_FACE_NOTE = "No face found. Tick 'classify the whole image as one face' to classify it anyway."


def _frame_map(m: torch.Tensor, spec: dict) -> np.ndarray:
    """B x h x w maps on the centre crop -> B x input_size x input_size in [0, 1], aligned with the face crop."""
    crop, size = spec["crop_size"], spec["input_size"]
    m = torch.nn.functional.interpolate(m.float()[:, None], size=(crop, crop), mode="bilinear", align_corners=False)
    p = (size - crop) // 2
    # Zeros where the centre crop cut the frame off, as explain.Explainer does for its maps.
    m = torch.nn.functional.pad(m, (p, size - crop - p, p, size - crop - p))[:, 0]
    return m.clamp(0, 1).cpu().numpy()


def _mean_view_probs(logits: torch.Tensor, views: int) -> torch.Tensor:
    """(views * B) x C logits -> B x C probabilities averaged over the views."""
    return logits.float().softmax(-1).view(views, -1, logits.shape[-1]).mean(0)


@dataclass
class RawPredictions:
    probs: np.ndarray  # B x C fused probabilities
    member_probs: dict[str, np.ndarray]  # member -> B x C
    attention: dict[str, np.ndarray]  # "<member>/<layer>" -> B x input_size x input_size


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
        max_explained: int = 8, detect_max_side: int = 640, crop_px: int = 144,
    ):
        from ..models.fold import prepare_for_inference  # a copy: BatchNorm folded, channels_last (faster)

        self.model = prepare_for_inference(model.eval())
        self.device = next(model.parameters()).device
        self.spec = model.input_spec()
        self.class_names: list[str] = list(model.class_names)
        self.is_fusion = hasattr(model, "member_names")
        self.backbones: list[str] = list(model.member_names) if self.is_fusion else [model.arch]
        self.detector = detector
        self.explainer = explainer
        self.source = source or ModelSource("memory", model.arch, str(self.device), model.arch)
        self.max_faces, self.max_explained = max_faces, max_explained
        self.detect_max_side, self.crop_px = detect_max_side, crop_px

    # --- building blocks ------------------------------------------------------------------------------------
    def get_detector(self, detector: Union[str, FaceDetector, None] = None) -> FaceDetector:
        d = detector or self.detector
        return get_detector(d) if isinstance(d, str) else d

    def _forward(self, x: torch.Tensor):
        if self.is_fusion:
            out = self.model(x, return_members=True, return_attention=True)
            return out.logits, out.member_logits, out.attention
        if getattr(self.model, "has_attention", False):
            logits, att = self.model(x, return_attention=True)
            return logits, {self.model.arch: logits}, {self.model.arch: att}
        logits = self.model(x)
        return logits, {self.model.arch: logits}, {}

    @torch.inference_mode()
    def predict_crops(self, crops: Sequence[np.ndarray], tta: bool = False) -> RawPredictions:
        """Probabilities for face crops (uint8, any size), all in one batch; ten-crop averages 10 views."""
        x = prepare_faces(list(crops), self.spec, tta="tencrop" if tta else "center").to(self.device)
        if tta:
            views = x.shape[0]
            logits, members, att = self._forward(x.flatten(0, 1))
            probs = _mean_view_probs(logits, views)
            member_probs = {k: _mean_view_probs(v, views) for k, v in members.items()}
            # Attention is shown for the centre view (index 4 of ten_crop's order) only.
            att = {m: {k: v.view(views, -1, *v.shape[1:])[4] for k, v in layers.items()} for m, layers in att.items()}
        else:
            logits, members, att = self._forward(x)
            probs = logits.float().softmax(-1)
            member_probs = {k: v.float().softmax(-1) for k, v in members.items()}
        attention = {f"{m}/{k}": _frame_map(v, self.spec) for m, layers in att.items() for k, v in layers.items()}
        return RawPredictions(probs.cpu().numpy(), {k: v.cpu().numpy() for k, v in member_probs.items()}, attention)

    def class_index(self, target: Union[None, int, str]) -> Optional[int]:
        """None (the predicted class), a class index, or a class name -> index or None."""
        if target is None or target == "" or (isinstance(target, str) and target.lower() in ("predicted", "auto")):
            return None
        if isinstance(target, str) and target.lstrip("-").isdigit():
            target = int(target)
        if isinstance(target, (int, np.integer)):
            if not 0 <= int(target) < len(self.class_names):
                raise InputError(f"Target class index {target} is out of range 0..{len(self.class_names) - 1}.")
            return int(target)
        if target not in self.class_names:
            raise InputError(f"Unknown target class {target!r}; choose one of {self.class_names}.")
        return self.class_names.index(target)

    def _explain(self, crops: Sequence[np.ndarray], method: Optional[str], target: Optional[int]):
        if self.explainer is None:
            raise RuntimeError("this predictor has no explainer")
        x = prepare_faces(list(crops), self.spec, tta="center").to(self.device)
        kwargs: dict[str, Any] = {"target": target}
        if method:
            kwargs["method"] = method
        try:
            return self.explainer.explain(x, **kwargs)
        except ValueError as e:  # e.g. an unknown method name typed into the API
            raise InputError(f"Cannot compute the explanation: {e}") from e

    def explain_crops(self, crops: Sequence[np.ndarray], method: Optional[str] = None,
                      target: Optional[int] = None) -> dict[str, np.ndarray]:
        """Grad-CAM maps ``{name: B x S x S}`` for crops (centre view), via the injected explainer."""
        exp = self._explain(crops, method, target)
        return {k: np.asarray(v, dtype=np.float32) for k, v in exp.heatmaps.items()}

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
        batched forward pass (and the explained ones through the explainer in one more, or in the same one
        when every face is explained without TTA). Timings of these shared stages are the whole batch's."""
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
        """``(raw predictions of every crop, the explanation of the `explained` crops or None, timings)``."""
        t = time.perf_counter()
        if explained and len(explained) == len(crops) and not tta:
            # The explainer's own forward pass already gives every probability and attention map: one pass.
            exp = self._explain(crops, cam_method, target_idx)
            raw = RawPredictions(np.asarray(exp.probs), {k: np.asarray(v) for k, v in exp.member_probs.items()},
                                 {k: np.asarray(v) for k, v in exp.attention.items()})
            return raw, exp, {"classify+explain": (time.perf_counter() - t) * 1000}
        raw = self.predict_crops(crops, tta=tta)
        timings = {"classify": (time.perf_counter() - t) * 1000}
        exp = None
        if explained:
            t = time.perf_counter()
            exp = self._explain([crops[i] for i in explained], cam_method, target_idx)
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
            # The explainer maps attention onto the face frame through each layer's receptive field;
            # prefer its maps for the faces it explained, so they line up with the CAMs.
            faces[j].attention.update({k: np.asarray(v[row], np.float32) for k, v in exp.attention.items()})
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

        detector: ``"mtcnn"`` or ``"haar"`` (default: the predictor's); tta: ten-crop averaging;
        whole_image: classify the whole image as one face when no face is found; explain: Grad-CAM for up to
        ``max_explained`` faces (largest first) with ``cam_method`` and ``cam_target`` (None = predicted class).
        Boxes refer to the returned ``rgb`` (upright, downscaled to at most ``MAX_WORKING_SIDE``).
        """
        t = time.perf_counter()
        loaded = load_image(image)
        load_ms = (time.perf_counter() - t) * 1000
        analysis = self.analyze_array(
            loaded.pixels, detector=detector, tta=tta, whole_image=whole_image, explain=explain,
            cam_method=cam_method, cam_target=cam_target, max_explained=max_explained, notes=loaded.notes,
        )
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
