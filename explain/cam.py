"""Class activation maps for FER backbones and their fusion, on top of pytorch-grad-cam.

Methods: Grad-CAM (Selvaraju et al., ICCV 2017), Grad-CAM++ (Chattopadhay et al., WACV 2018), HiResCAM
(Draelos & Carin, 2020), LayerCAM (Jiang et al., TIP 2021) and EigenCAM (Muhammad & Yeasin, IJCNN 2020).
Each method's per-layer formula is pytorch-grad-cam's own ``get_cam_image``; this module drives the
forward and backward passes itself so that one forward serves every member and every map:

* one forward of the whole model (fused logits, member logits and CBAM attention maps together), with a
  forward hook on every member's CAM layer (``model.cam_target_layers()``);
* one backward of the sum of the members' own target logits: the members are independent branches, so this
  single pass gives each member the gradient of *its own* logit at *its own* layer;
* one backward of the fused target logit into all members' layers at once (FusionModel only).

Both backward passes use ``torch.autograd.grad`` with the CAM activations as the only inputs, so nothing below
the CAM layers is back-propagated and no parameter gradient is computed or written to ``.grad`` (the model is
shared with the app's prediction path). We do not use ``BaseCAM.forward`` because it calls ``loss.backward()``
(every parameter gradient of every member, plus ``model.zero_grad()`` on the shared model) and needs one forward
per objective, i.e. two forwards for "members' own logits" and "fused logit"; it also matches gradients to
layers by backward-completion order, which is not guaranteed for parallel branches.

Each map goes through pytorch-grad-cam's post-processing (ReLU, per-face min-max to [0, 1] with
``scale_cam_image``, bilinear upsampling to the crop, min-max again so its peak is exactly 1) and is pasted into
the ``input_size`` face frame that ``prepare_faces`` centre-cropped from, with zeros on the border the crop cut
off. By default (``align="receptive_field"``) the upsampling puts each cell on the pixel its receptive field is
centred on (:mod:`explain.geometry`) instead of stretching the grid over the crop as pytorch-grad-cam does
(``align="stretch"``): at 44 px the two differ by 1.5 px for the ResNets and by up to 3.6 px for the VGGs.

Defaults (method, fusion combination, alignment) are what the faithfulness measurement
(:mod:`explain.faithfulness`) favoured; see docs/README_explain.md for the numbers and how to re-decide them.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import threading
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM
from pytorch_grad_cam.base_cam import BaseCAM
from pytorch_grad_cam.utils.image import scale_cam_image
from torch import nn

from fer_models import FERModel
from fer_models.models.geometry import Geometry, attention_to_frame, member_geometries, upsample
from fer_models.models.predict import Target, resolve_targets
from fer_models.models.preprocess import center_offset, prepare_faces, to_face_frame

log = logging.getLogger(__name__)

_CAM_CLASSES: dict[str, type[BaseCAM]] = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "hirescam": HiResCAM,
    "layercam": LayerCAM,
    "eigencam": EigenCAM,
}
METHODS: tuple[str, ...] = tuple(_CAM_CLASSES)
# Methods that need no gradient (and so no target class): their maps are the same for every target.
TARGET_FREE_METHODS = frozenset({"eigencam"})
# The defaults below are what the faithfulness measurements favoured; the numbers are in docs/explain.md.
DEFAULT_METHOD = "gradcam"
FUSION_COMBINE = ("mean", "contribution")   # first = default
ALIGN = ("receptive_field", "stretch")      # first = default


@dataclass
class Explanation:
    """CAMs of a batch of faces, aligned with the ``input_size`` face frame (see the module docstring).

    ``heatmaps`` has one B x input_size x input_size float32 map in [0, 1] per member backbone (keyed by the
    member name, or the architecture name for a single backbone) plus ``"fusion"`` for a FusionModel.
    ``attention`` maps ``"<member>/<layer>"`` to the CBAM spatial attention (sigmoid values, not rescaled),
    resized to the same frame; it is empty when no member has attention.
    """

    method: str
    targets: np.ndarray                      # (B,) int64: the class each face is explained for
    heatmaps: dict[str, np.ndarray]
    attention: dict[str, np.ndarray]
    probs: np.ndarray                        # (B, C) model.probabilities of the (fused) logits, centre view
    member_probs: dict[str, np.ndarray]      # member name -> (B, C) the same for its own logits
    class_names: list[str]
    crop_box: tuple[int, int, int, int]      # (x0, y0, x1, y1) of the explained crop inside the face frame
    fusion_weights: dict[str, np.ndarray] = field(default_factory=dict)  # member -> (B,) weight in "fusion"
    # member -> (B,) first-order contribution of the member's CAM layer to the fused target logit,
    # sum(grad * activation), in logit units (which backbone drove the decision); fusion models and
    # gradient methods only, else empty
    contributions: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def target_names(self) -> list[str]:
        return [self.class_names[int(t)] for t in self.targets]


@functools.lru_cache(maxsize=None)
def _cam_formula(method: str) -> BaseCAM:
    """pytorch-grad-cam object used only for its per-layer formula (``get_cam_image``).

    Built over a one-parameter dummy with no target layers, so it registers no hooks on any real model and
    holds no per-call state: one shared instance per method is safe across Explainers and threads.
    """
    return _CAM_CLASSES[method](model=nn.Linear(1, 1), target_layers=[])


class Explainer:
    """CAMs for any :class:`~fer_models.FERModel`, fusion models included; reusable and thread-safe.

    The ``"fusion"`` map comes from the gradient of the *fused* target logit at every member's CAM layer (one
    backward pass), turned into one map per member with the method's formula; each is upsampled to the crop and
    min-max normalised, so members with 5x5 (VGG) and 11x11 (ResNet) CAM layers meet on the same grid and
    scale. ``fusion_combine`` says how those per-member maps are combined:

    * ``"mean"`` (default): their plain mean, then min-max again. This is what pytorch-grad-cam's
      ``aggregate_multi_layers`` does with several target layers (resize each to the input, ReLU, mean,
      normalise). How much each member matters still shows through the fused gradient's *shape* (the head
      mixes classes), but not through its size, since each map is normalised first.
    * ``"contribution"``: a weighted mean, each member weighted by its first-order contribution to the fused
      target logit at its CAM layer, ``max(0, sum(grad * act))`` (the fused logit's gradient times the
      activation, summed over channels and positions: for a CAM layer followed only by pooling and linear
      layers, exactly the member's share of the logit). A member the head leans on dominates the map; one
      with no evidence for the class drops out. Faces where no member contributes positively are weighted by
      the size of each member's (negative) contribution, and by the plain mean if all are exactly zero.

    On the synthetic task ROAD preferred ``"mean"`` (+0.04); re-measure on real faces with
    ``python -m explain.faithfulness --fusion-combine ...``. Either way ``Explanation.contributions`` reports
    the members' signed contributions. EigenCAM has no gradient and always uses the plain mean.

    ``align``: ``"receptive_field"`` (default) puts each cell on the pixel its receptive field is centred on
    (:mod:`explain.geometry`); ``"stretch"`` stretches each CAM grid over the crop exactly as pytorch-grad-cam.
    """

    def __init__(self, model: FERModel, *, fusion_combine: str = FUSION_COMBINE[0], align: str = ALIGN[0]):
        if fusion_combine not in FUSION_COMBINE:
            raise ValueError(f"unknown fusion_combine {fusion_combine!r}; choose from {FUSION_COMBINE}")
        if align not in ALIGN:
            raise ValueError(f"unknown align {align!r}; choose from {ALIGN}")
        self.model = model.eval()
        self.fusion_combine = fusion_combine
        self.align = align
        self.fuses = model.fuses_members  # the decision combines members: it gets its own "fusion" map
        self.layers: dict[str, nn.Module] = model.cam_target_layers()
        self.spec = model.input_spec()
        self._geometry: dict[tuple, tuple[dict, dict]] = {}
        self._geometry_lock = threading.Lock()

    @property
    def map_names(self) -> list[str]:
        """Keys of ``Explanation.heatmaps``, in order: members, then ``"fusion"`` for a fusion model."""
        return list(self.layers) + (["fusion"] if self.fuses else [])

    # --- public API -----------------------------------------------------------------------------------------
    def explain_faces(self, faces: Sequence[np.ndarray], method: str = DEFAULT_METHOD, target: Target = None
                      ) -> Explanation:
        """Explain uint8 face crops (any size, grey or RGB): the same centre-crop preprocessing as prediction."""
        return self.explain(prepare_faces(faces, self.spec, tta="center"), method=method, target=target)

    def explain(self, x: torch.Tensor, method: str = DEFAULT_METHOD, target: Target = None) -> Explanation:
        """CAMs for normalised faces ``x`` (B x C x crop x crop, the output of ``prepare_faces``).

        ``target``: None explains each face's (fused) prediction; an int or class name explains that class for
        every face; a sequence gives one class per face. Works under ``torch.no_grad()`` and
        ``torch.inference_mode()`` (gradients are switched back on locally) and always runs in float32.
        """
        if method not in _CAM_CLASSES:
            raise ValueError(f"unknown CAM method {method!r}; choose from {METHODS}")
        x = self._check_input(x)
        needs_grad = method not in TARGET_FREE_METHODS
        self.model.eval()
        device = next(self.model.parameters()).device
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.set_grad_enabled(needs_grad))
            stack.enter_context(torch.autocast(device.type, enabled=False))
            acts = stack.enter_context(self._capture(needs_grad))
            # clone: an inference-mode tensor from the caller cannot take part in autograd
            x = x.detach().to(device=device, dtype=torch.float32).clone()
            out = self.model(x, attention=True)
            logits, member_logits = out.logits, out.member_logits
            targets = resolve_targets(target, self.model.class_names, logits.detach().argmax(1))
            if needs_grad:
                own_grads, fused_grads = self._gradients(logits, member_logits, acts, targets)
        missing = [n for n in self.layers if n not in acts]
        if missing:
            raise RuntimeError(f"CAM layers of {missing} did not run in the forward pass")

        acts_np = {n: a.detach().float().cpu().numpy() for n, a in acts.items()}
        crop_hw = tuple(x.shape[-2:])
        cam_geo, grid_geo = self._geometries(x)
        place = {n: (cam_geo.get(n) or Geometry.stretched(a.shape[-2:], crop_hw), crop_hw)
                 for n, a in acts_np.items()}
        formula = _cam_formula(method)
        heat, weights, contributions = {}, {}, {}
        for n, a in acts_np.items():
            g = own_grads[n] if needs_grad else None
            heat[n] = _layer_map(formula, a, g, *place[n])
        if self.fuses:
            if needs_grad:
                contributions = {n: (fused_grads[n] * a).reshape(a.shape[0], -1).sum(1) for n, a in acts_np.items()}
            heat["fusion"], weights = self._fusion_map(formula, acts_np, fused_grads if needs_grad else None,
                                                       contributions, heat, place)

        frame = self.spec["input_size"]
        top, left = center_offset(frame, crop_hw[0]), center_offset(frame, crop_hw[1])
        with torch.no_grad():
            probs, member_probs = self.model.probabilities(out)
        return Explanation(
            method=method,
            targets=targets.cpu().numpy().astype(np.int64),
            heatmaps={k: to_face_frame(v, frame) for k, v in heat.items()},
            attention=attention_to_frame(out.attention, grid_geo, crop_hw, frame),
            probs=probs.detach().cpu().numpy(),
            member_probs={n: p.detach().cpu().numpy() for n, p in member_probs.items()},
            class_names=self.model.class_names,
            crop_box=(left, top, left + crop_hw[1], top + crop_hw[0]),
            fusion_weights=weights,
            contributions={n: c.astype(np.float32) for n, c in contributions.items()},
        )

    # --- steps --------------------------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a tensor from prepare_faces, got {type(x).__name__}")
        if x.dim() == 5:
            raise ValueError("got a ten-crop batch (10 x B x C x H x W); explain the centre crop (tta='center')")
        if x.dim() != 4 or x.shape[1] != self.spec["in_chans"]:
            raise ValueError(f"expected B x {self.spec['in_chans']} x H x W normalised faces, got {tuple(x.shape)}")
        if max(x.shape[-2:]) > self.spec["input_size"]:
            raise ValueError(f"faces are {tuple(x.shape[-2:])}, larger than input_size {self.spec['input_size']}")
        if x.shape[0] == 0:
            raise ValueError("empty batch")
        return x

    def _geometries(self, x: torch.Tensor) -> tuple[dict[str, Geometry], dict[tuple, Geometry]]:
        """Where each CAM layer's and each feature map size's cells sit in the crop (probed once per crop size)."""
        key = tuple(x.shape[1:])
        if self.align == "stretch":
            return {}, {}
        with self._geometry_lock:
            if key not in self._geometry:
                by_module, by_shape = member_geometries(self.model, key, x.device)
                cam = {n: by_module[layer] for n, layer in self.layers.items() if layer in by_module}
                for n in self.layers:
                    if n not in cam:
                        log.warning("cannot trace where %s's CAM cells sit; stretching its maps over the crop", n)
                self._geometry[key] = (cam, by_shape)
            return self._geometry[key]

    @contextlib.contextmanager
    def _capture(self, needs_grad: bool) -> Iterator[dict[str, torch.Tensor]]:
        """Forward hooks recording each CAM layer's output; removed on exit, even on errors.

        With ``needs_grad`` the hook swaps the output for a detached leaf that requires grad: gradients then
        stop at the CAM layer (nothing below it is back-propagated) and work even if the caller froze the
        weights. Hooks only act in the calling thread, so concurrent predictions through the same model (or
        other explanations) are not disturbed.
        """
        owner = threading.get_ident()
        store: dict[str, torch.Tensor] = {}

        def make_hook(name: str):
            def hook(module: nn.Module, args, output):
                if threading.get_ident() != owner:
                    return None
                if not isinstance(output, torch.Tensor):
                    raise TypeError(f"CAM layer of {name} returns {type(output).__name__}, not a tensor")
                if name in store:
                    raise RuntimeError(f"CAM layer of {name} ran twice in one forward pass")
                out = output.detach()
                if needs_grad:
                    out.requires_grad_(True)
                store[name] = out
                return out
            return hook

        handles = [layer.register_forward_hook(make_hook(n)) for n, layer in self.layers.items()]
        try:
            yield store
        finally:
            for h in handles:
                h.remove()

    def _gradients(self, logits, member_logits, acts, targets):
        """Gradients at every CAM layer of (a) each member's own target logit and (b) the fused target logit.

        Faces are independent in eval mode, so summing the selected logits over the batch gives every face its
        own gradient in one pass; the members are independent branches, so summing their logits does too.
        """
        names = list(self.layers)
        inputs = [acts[n] for n in names]
        idx = targets[:, None]
        own_obj = sum(member_logits[n].gather(1, idx).sum() for n in names)
        own = torch.autograd.grad(own_obj, inputs, retain_graph=self.fuses, allow_unused=True)
        own_grads = {n: _grad_np(g, a) for n, g, a in zip(names, own, inputs)}
        fused_grads = None
        if self.fuses:
            fused = torch.autograd.grad(logits.gather(1, idx).sum(), inputs, allow_unused=True)
            fused_grads = {n: _grad_np(g, a) for n, g, a in zip(names, fused, inputs)}
        return own_grads, fused_grads

    def _fusion_map(self, formula: BaseCAM, acts: dict[str, np.ndarray], fused_grads: Optional[dict],
                    contributions: dict[str, np.ndarray], own_maps: dict[str, np.ndarray], place: dict[str, tuple]):
        """The fused decision's map and each member's weight in it (see the class docstring)."""
        names = list(acts)
        b = next(iter(acts.values())).shape[0]
        if fused_grads is None:  # target-free method: the members' maps do not depend on the head
            maps = [own_maps[n] for n in names]
            w = np.full((len(names), b), 1.0 / len(names), np.float32)
        else:
            maps = [_layer_map(formula, acts[n], fused_grads[n], *place[n]) for n in names]
            if self.fusion_combine == "contribution":
                signed = np.stack([contributions[n] for n in names])
                contrib = np.maximum(signed, 0)
                # no positive evidence anywhere: weigh by the size of each member's influence instead
                contrib = np.where(contrib.sum(0, keepdims=True) > 0, contrib, np.abs(signed))
                total = contrib.sum(0, keepdims=True)
                w = np.where(total > 0, contrib / np.where(total > 0, total, 1), 1.0 / len(names))
            else:
                w = np.full((len(names), b), 1.0 / len(names))
        fused = sum(wi[:, None, None] * m for wi, m in zip(w.astype(np.float32), maps))
        return scale_cam_image(fused), {n: w[i].astype(np.float32) for i, n in enumerate(names)}


# --- array helpers -------------------------------------------------------------------------------------------
def _grad_np(g: Optional[torch.Tensor], a: torch.Tensor) -> np.ndarray:
    """A gradient as numpy; zeros for a layer the objective does not depend on."""
    if g is None:
        return np.zeros(tuple(a.shape), np.float32)
    return g.detach().float().cpu().numpy()


def _layer_map(formula: BaseCAM, acts: np.ndarray, grads: Optional[np.ndarray], geometry: Geometry,
               crop_hw: tuple[int, int]) -> np.ndarray:
    """One layer's CAM as pytorch-grad-cam's ``compute_cam_per_layer`` + ``aggregate_multi_layers`` compute it
    for a single layer (ReLU, min-max, upsample, min-max), upsampled with ``geometry``: B x H x W in [0, 1]."""
    with _single_threaded_blas():
        cam = formula.get_cam_image(None, None, None, acts, grads, False)
    return scale_cam_image(upsample(scale_cam_image(np.maximum(cam, 0)), geometry, crop_hw))


@functools.lru_cache(maxsize=1)
def _blas_controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _single_threaded_blas():
    """EigenCAM's per-face SVDs are tiny (at most 121 x 512): multi-threaded OpenBLAS only spins on them (on a busy
    2-core machine it made EigenCAM an order of magnitude slower; benchmarks/explain_speed.py measures it)."""
    return _blas_controller().limit(limits=1, user_api="blas")
