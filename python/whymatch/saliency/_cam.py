"""Activation capture and gradient-weighted class activation maps, shared by the gradient explainers.

Hooks live only while a forward pass runs (:class:`ActivationCapture` is a
context manager), so an explainer never leaves hooks on a user's model.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..similarity import SimilarityModel

__all__ = ["resolve_target_layers", "auto_layer", "ActivationCapture", "check_differentiable", "warn_if_training",
           "grad_cam", "combine_layers"]


def _names(root: nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in root.named_modules()}


def auto_layer(sim: SimilarityModel, images: Tensor) -> list[tuple[str, nn.Module]]:
    """The last module (in execution order) whose output is a feature map (B, C, h, w) with h * w > 1.

    Found with one forward pass of a zero image shaped like ``images`` (B, C, H, W).
    """
    in_channels, size = images.shape[1], tuple(images.shape[2:])
    root = sim.embedder
    names = _names(root)
    order: list[nn.Module] = []

    def hook(module: nn.Module, _inp, out) -> None:
        if isinstance(out, Tensor) and out.dim() == 4 and out.shape[2] * out.shape[3] > 1 and module is not root:
            order.append(module)

    handles = [m.register_forward_hook(hook) for m in root.modules()]
    try:
        with torch.no_grad():
            sim(torch.zeros(1, in_channels, *size, device=sim.device))
    finally:
        for h in handles:
            h.remove()
    if not order:
        raise ValueError("target_layers=None: found no module of the embedder whose output is a feature map "
                         "(B, C, h, w) with h * w > 1; name the layer explicitly, e.g. target_layers='layer4'")
    return [(names[id(order[-1])], order[-1])]


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


class ActivationCapture:
    """Records the outputs of ``layers`` during forward passes inside the ``with`` block."""

    def __init__(self, layers: list[tuple[str, nn.Module]]) -> None:
        self.layers = layers
        self.outputs: list[list[Tensor]] = [[] for _ in layers]
        self._handles: list = []

    def __enter__(self) -> ActivationCapture:
        for i, (name, module) in enumerate(self.layers):
            def hook(_m, _inp, out, i=i, name=name):
                if not isinstance(out, Tensor) or out.dim() != 4:
                    got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                    raise ValueError(f"target layer {name!r} must output a feature map (B, C, h, w), got {got}")
                self.outputs[i].append(out)
            self._handles.append(module.register_forward_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def single(self) -> list[Tensor]:
        """The one activation per layer recorded by one forward pass."""
        acts = []
        for (name, _), outs in zip(self.layers, self.outputs):
            if len(outs) != 1:
                raise ValueError(f"target layer {name!r} ran {len(outs)} times in one forward pass; "
                                 "grad-CAM needs a layer that runs exactly once (pick another layer)")
            acts.append(outs[0])
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
