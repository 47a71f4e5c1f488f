"""Activation capture and gradient-weighted class activation maps, shared by the gradient explainers.

Hooks live only while a forward pass runs (:class:`ActivationCapture` is a
context manager), so an explainer never leaves hooks on a user's model.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..similarity import SimilarityModel
from . import _common

__all__ = ["resolve_target_layers", "auto_layer", "validate_layers", "TargetLayers", "ActivationCapture", "check_differentiable",
           "warn_if_training", "grad_cam", "combine_layers", "warn_if_constant"]


def _names(root: nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in root.named_modules()}


def _shape(out: object) -> str:
    return str(tuple(out.shape)) if isinstance(out, Tensor) else type(out).__name__


class _Probe:
    """One forward (and backward) pass of a constant image through the embedder, seen by hooks that record
    only the current thread's forward: how often each module ran, its first output, and whether the
    gradient of the embedding reaches that output."""

    def __init__(self, sim: SimilarityModel, images: Tensor, modules: Sequence[nn.Module]) -> None:
        in_channels, size = images.shape[1], tuple(images.shape[2:])
        me = threading.get_ident()
        self.calls: dict[int, int] = {}
        self.outputs: dict[int, object] = {}
        self.order: list[nn.Module] = []

        def hook(module: nn.Module, _inp, out) -> None:
            if threading.get_ident() != me:
                return
            n = self.calls.get(id(module), 0) + 1
            self.calls[id(module)] = n
            if n == 1:
                self.order.append(module)
                self.outputs[id(module)] = out

        handles = [m.register_forward_hook(hook) for m in modules]
        try:
            with torch.enable_grad(), contextlib.ExitStack() as stack:
                for m in sim.modules():  # a DDP module inside: this pass must not arm its gradient reducer
                    if isinstance(m, nn.parallel.DistributedDataParallel):
                        stack.enter_context(m.no_sync())
                x = torch.zeros(1, in_channels, *size, device=sim.device, requires_grad=True)
                emb = sim(x)
        finally:
            for h in handles:
                h.remove()
        # which recorded outputs the embedding's gradient reaches (None: not on the graph)
        self.reached: set[int] = set()
        keys = [k for k, o in self.outputs.items() if isinstance(o, Tensor) and o.requires_grad]
        if keys and emb.requires_grad:
            grads = torch.autograd.grad(emb.float().sum(), [self.outputs[k] for k in keys], allow_unused=True)
            self.reached = {k for k, g in zip(keys, grads) if g is not None}

    def problem(self, module: nn.Module) -> str | None:
        """Why ``module`` cannot be a Grad-CAM target layer, or None when it can."""
        n = self.calls.get(id(module), 0)
        if n == 0:
            return "did not run in the embedder's forward pass"
        if n > 1:
            return (f"ran {n} times in one forward pass (a module reused, e.g. one activation shared by several "
                    "blocks); Grad-CAM needs a layer that runs exactly once")
        out = self.outputs[id(module)]
        if not isinstance(out, Tensor) or out.dim() != 4:
            return f"must output a feature map (B, C, h, w), got {_shape(out)}"
        if out.shape[2] * out.shape[3] <= 1:
            return (f"outputs a {out.shape[2]}x{out.shape[3]} map, one position: its Grad-CAM map would be "
                    "constant (pick a layer with h * w > 1)")
        if id(module) not in self.reached:
            return ("is not reached by the gradient of the embedding (its output is detached, unused, or "
                    "computed under torch.no_grad())")
        return None


def auto_layer(sim: SimilarityModel, images: Tensor) -> list[tuple[str, nn.Module]]:
    """The last module (in execution order) that runs exactly once per forward pass and outputs a feature
    map (B, C, h, w) with h * w > 1 that the gradient of the embedding reaches.

    Found with one forward and backward pass of a zero image shaped like ``images`` (B, C, H, W); safe to
    call from several threads (each call sees only its own forward pass).
    """
    root = sim.embedder
    names = _names(root)
    probe = _Probe(sim, images, [m for m in root.modules() if m is not root])
    good = [m for m in probe.order if probe.problem(m) is None]
    if not good:
        raise ValueError("target_layers=None: found no module of the embedder that runs once per forward pass "
                         "and outputs a feature map (B, C, h, w) with h * w > 1 reached by the gradient; name "
                         "the layer explicitly, e.g. target_layers='layer4'")
    return [(names[id(good[-1])], good[-1])]


def validate_layers(sim: SimilarityModel, layers: list[tuple[str, nn.Module]], images: Tensor) -> None:
    """Raise a ValueError naming the first layer of ``layers`` that cannot be a Grad-CAM target for
    images shaped like ``images`` (B, C, H, W), and why; one forward and backward pass of one image."""
    probe = _Probe(sim, images, [m for _, m in layers])
    for name, module in layers:
        why = probe.problem(module)
        if why is not None:
            raise ValueError(f"target layer {name!r} {why}")


def resolve_target_layers(sim: SimilarityModel, target_layers: object) -> list[tuple[str, nn.Module]] | None:
    """[(name, module)] for names (relative to the embedder, 'embedder.' prefix allowed) or modules.

    Returns None for ``target_layers=None`` (found on first use by :func:`auto_layer`).
    """
    if target_layers is None:
        return None
    items = [target_layers] if isinstance(target_layers, (str, nn.Module)) else target_layers
    if not isinstance(items, Sequence) or isinstance(items, str) or len(items) == 0:
        raise ValueError(f"target_layers must be a layer name, a module or a non-empty list of them, "
                         f"got {target_layers!r}")
    root = sim.embedder
    by_name = dict(root.named_modules())
    names = _names(root)
    out = []
    for item in items:
        if isinstance(item, str):
            key = item[len("embedder."):] if item.startswith("embedder.") else item
            if key not in by_name or key == "":
                some = [n for n in by_name if n][:12]
                raise ValueError(f"target_layers: the embedder has no module named {item!r}; "
                                 f"some of its modules: {', '.join(some)}")
            out.append((key, by_name[key]))
        elif isinstance(item, nn.Module):
            if id(item) not in names or item is root:
                raise ValueError(f"target_layers: module {type(item).__name__} is not a submodule of the "
                                 "SimilarityModel's embedder")
            out.append((names[id(item)], item))
        else:
            raise TypeError(f"target_layers entries must be str or nn.Module, got {type(item).__name__}")
    return out


class TargetLayers:
    """The target layers of a gradient explainer: ``self._layers`` ([(name, module)], or None until the
    first call picks them with :func:`auto_layer`)."""

    sim: SimilarityModel
    _layers: list[tuple[str, nn.Module]] | None

    # the pytorch-grad-cam idiom: ``with Explainer(...) as ex:``; no hook stays registered between calls
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        """Nothing stays registered between calls; kept for the pytorch-grad-cam idiom."""

    @property
    def target_layer_names(self) -> list[str] | None:
        """The target layers' names (None until the first call when they are picked automatically)."""
        return None if self._layers is None else [n for n, _ in self._layers]

    @property
    def target_layers(self) -> list[nn.Module] | None:
        """The target modules (None until the first call when they are picked automatically)."""
        return None if self._layers is None else [m for _, m in self._layers]

    def _layers_for(self, images: Tensor) -> list[tuple[str, nn.Module]]:
        layers = self._layers
        if layers is None:  # concurrent first calls find the same layer; the last assignment wins
            layers = auto_layer(self.sim, images)
            self._layers = layers
        return layers

    def _check_layers(self, images: Tensor) -> None:
        """Pick the layers (``target_layers=None``) or validate the given ones on images like ``images``."""
        if self._layers is None:
            self._layers_for(images)
        else:
            validate_layers(self.sim, self._layers, images)


class ActivationCapture:
    """Records the outputs of ``layers`` during the forward passes that the entering thread runs inside the
    ``with`` block.

    The hooks ignore forward passes of other threads, so several threads may explain with one shared
    model at once: each capture sees only its own thread's activations.
    """

    def __init__(self, layers: list[tuple[str, nn.Module]]) -> None:
        self.layers = layers
        self.outputs: list[list[Tensor]] = [[] for _ in layers]
        self._handles: list = []

    def __enter__(self) -> ActivationCapture:
        owner = threading.get_ident()
        for i, (name, module) in enumerate(self.layers):
            def hook(_m, _inp, out, i=i, name=name):
                if threading.get_ident() != owner:
                    return  # another thread's forward pass through the shared model
                if not isinstance(out, Tensor) or out.dim() != 4:
                    raise ValueError(f"target layer {name!r} must output a feature map (B, C, h, w), "
                                     f"got {_shape(out)}")
                self.outputs[i].append(out)
            try:
                self._handles.append(module.register_forward_hook(hook))
            except BaseException:
                self.__exit__()
                raise
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def single(self) -> list[Tensor]:
        """The one activation per layer recorded by one forward pass."""
        acts = []
        for (name, _), outs in zip(self.layers, self.outputs):
            if len(outs) == 0:
                raise ValueError(f"target layer {name!r} did not run in the embedder's forward pass; "
                                 "pick a layer that does")
            if len(outs) != 1:
                raise ValueError(f"target layer {name!r} ran {len(outs)} times in one forward pass (a module "
                                 "reused, e.g. one activation shared by several blocks); grad-CAM needs a layer "
                                 "that runs exactly once (pick another layer)")
            acts.append(outs[0])
        return acts

    def single_maps(self) -> list[Tensor]:
        """:meth:`single`, and every activation a map with more than one position (h * w > 1)."""
        acts = self.single()
        for (name, _), a in zip(self.layers, acts):
            if a.shape[2] * a.shape[3] <= 1:
                raise ValueError(f"target layer {name!r} outputs a {a.shape[2]}x{a.shape[3]} map, one position: "
                                 "its grad-CAM map would be constant (pick a layer with h * w > 1)")
        return acts


def warn_if_training(sim: SimilarityModel, method: str) -> None:
    """Warn when BatchNorm or Dropout layers of the embedder are in training mode."""
    kinds = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)
    if any(m.training for m in sim.embedder.modules() if isinstance(m, kinds)):
        warnings.warn(f"{method}: the embedder has BatchNorm/Dropout layers in training mode; BatchNorm mixes "
                      "the images of a batch and Dropout is random (call .eval() on the model)", stacklevel=3)


def check_differentiable(score: Tensor, acts: Sequence[Tensor], method: str) -> None:
    if not score.requires_grad or any(not a.requires_grad for a in acts):
        raise ValueError(f"{method} needs gradients of the similarity w.r.t. the target layer's activations, "
                         "but the model produced none (does its forward run under torch.no_grad(), "
                         "detach, or convert to numpy?)")


def grad_cam(acts: Tensor, grads: Tensor, size: tuple[int, int]) -> Tensor:
    """ReLU(sum_c alpha_c A_c) with alpha = spatial mean of the gradient, upsampled bilinearly to ``size``.

    acts, grads: (B, C, h, w). Returns (B, H, W) float32 (keeps the graph when the inputs have one).
    """
    alpha = grads.float().mean(dim=(2, 3), keepdim=True)
    cam = F.relu((alpha * acts.float()).sum(dim=1, keepdim=True))
    return F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[:, 0]


def combine_layers(maps: list[Tensor]) -> Tensor:
    """One layer: its map as is. Several: each scaled by its per-image maximum, then averaged.

    (Layers differ in scale by orders of magnitude; pytorch-grad-cam aggregates the same way.)
    """
    if len(maps) == 1:
        return maps[0]
    scaled = [m / m.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None] for m in maps]
    return torch.stack(scaled).mean(dim=0)


def warn_if_constant(maps: Tensor, method: str, layers: list[tuple[str, nn.Module]]) -> None:
    """Warn (naming the method and the layer) when some of the maps (B, H, W) are constant, e.g. all zero."""
    if maps.numel() == 0:
        return
    names = ", ".join(repr(name) for name, _ in layers)
    _common.warn_if_constant(maps, method, f"at target layer {names}: the gradient there does not single out "
                             "any position (ReLU of a weighted sum that is negative everywhere: e.g. a BatchNorm output "
                             "before its activation, mostly negative, as EfficientNet's '_bn1'; or a saturated "
                             "activation); the layer after the activation, or another target_layers, may explain more", stacklevel=_caller_level() + 1)


def _caller_level() -> int:
    """The ``stacklevel`` (for a warnings.warn in the caller) of the first frame outside whymatch.saliency."""
    here = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(here + os.sep):
        frame, level = frame.f_back, level + 1
    return level
