"""The SANE attribute explanation network: a conv trunk, a kxk conv to one activation map per attribute.

Plummer et al., "Why do These Match?" (ECCV 2020), section 3.2: an attribute
classifier whose spatial activation maps n_i (one per attribute i) can be compared
with the saliency map of a match. The published network is a ResNet-50 trunk, a 3x3
convolution without bias to A channels (a 4 x 4 map at 112 px) and average pooling;
whymatch builds the same head on any trunk that returns a feature map.

The shipped ShapesWorld weights (``whymatch/models/weights/shapesworld_attributes.pt``) are
written by ``benchmarks/attribute_causal.py`` (``--write-shipped`` / ``--ship-from``: the head on
the similarity model's frozen trunk that the run chose on validation classes);
``scripts/train_shapesworld_attributes.py`` rebuilds them from its results and writes them where missing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import _validate as V

__all__ = ["AttributeOutput", "AttributeModel", "build_attribute_model", "attribute_model_state",
           "load_attribute_model", "load_default_attribute_model", "default_attribute_weights_path",
           "ATTRIBUTE_BACKBONES", "WEIGHTS_RESOURCE", "TRAIN_SCRIPT"]

#: Trunks :func:`build_attribute_model` knows.
ATTRIBUTE_BACKBONES = ("shapes", "resnet18", "resnet50")
#: Package-relative location of the shipped ShapesWorld attribute weights.
WEIGHTS_RESOURCE = ("whymatch.models", "weights/shapesworld_attributes.pt")
#: The script that writes them.
TRAIN_SCRIPT = "scripts/train_shapesworld_attributes.py"
_FORMAT = 1


class AttributeOutput(NamedTuple):
    """What :class:`AttributeModel` returns.

    Attributes:
        maps: (B, A, h, w) float32 attribute activation maps n_i (unnormalized).
        logits: (B, A) float32, the global average pool of ``maps``.
        confidences: (B, A) float32, softmax of ``logits`` over the attributes (rows sum to 1).
    """

    maps: Tensor
    logits: Tensor
    confidences: Tensor


class AttributeModel(nn.Module):
    """Attribute activation maps and confidences of images: trunk -> kxk conv (no bias) -> average pool.

    Args:
        trunk: module mapping (preprocessed) images (B, 3, H, W) to a feature map (B, C, h, w).
        n_attributes: A, the number of attributes.
        channels: C; inferred with a dry run on a (1, 3, 64, 64) input when None.
        attribute_names: A names (default ``attr_0``, ``attr_1``, ...).
        kernel_size: k of the k x k convolution (odd; padding k // 2 keeps h x w). SANE: 3.
        preprocess: optional callable applied to the images first (e.g. mean/std
            normalization), so that the model takes images in [0, 1] like a
            :class:`whymatch.SimilarityModel`. An nn.Module is registered as a submodule.

    Shapes:
        input (B, 3, H, W) float in [0, 1]; output :class:`AttributeOutput`
        (maps (B, A, h, w), logits (B, A), confidences (B, A), float32).
    """

    def __init__(self, trunk: nn.Module, n_attributes: int, *, channels: int | None = None,
                 attribute_names: Sequence[str] | None = None, kernel_size: int = 3,
                 preprocess: Callable[[Tensor], Tensor] | None = None) -> None:
        super().__init__()
        if not isinstance(trunk, nn.Module):
            raise TypeError(f"trunk must be a torch.nn.Module, got {type(trunk).__name__}")
        self.n_attributes = V.positive_int("n_attributes", n_attributes)
        kernel_size = V.positive_int("kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (the map keeps the trunk's size), got {kernel_size}")
        if preprocess is not None and not callable(preprocess):
            raise TypeError(f"preprocess must be callable, got {type(preprocess).__name__}")
        if attribute_names is None:
            names = tuple(f"attr_{i}" for i in range(self.n_attributes))
        else:
            if isinstance(attribute_names, str) or not all(isinstance(n, str) for n in attribute_names):
                raise TypeError("attribute_names must be a sequence of strings")
            names = tuple(attribute_names)
            if len(names) != self.n_attributes:
                raise ValueError(f"attribute_names must hold n_attributes={self.n_attributes} names, "
                                 f"got {len(names)}")
            if len(set(names)) != len(names):
                raise ValueError("attribute_names must be distinct")
        self.attribute_names: tuple[str, ...] = names
        self.trunk = trunk
        self.preprocess = preprocess
        if channels is None:
            channels = self._infer_channels()
        self.channels = V.positive_int("channels", channels)
        self.kernel_size = kernel_size
        self.conv = nn.Conv2d(self.channels, self.n_attributes, kernel_size, padding=kernel_size // 2, bias=False)
        #: settings that rebuild this model through :func:`build_attribute_model` (set by it; else empty).
        self.config: dict = {}

    def _infer_channels(self) -> int:
        """C of the trunk's feature map, from a dry run in eval mode (BN statistics untouched)."""
        dev = next((t.device for t in self.trunk.parameters()), torch.device("cpu"))
        was = self.trunk.training
        self.trunk.eval()
        try:
            with torch.no_grad():
                x = torch.zeros(1, 3, 64, 64, device=dev)
                if self.preprocess is not None:
                    x = self.preprocess(x)
                f = self.trunk(x)
        except Exception as exc:  # noqa: BLE001 - any failure means: give channels explicitly
            raise ValueError(f"channels could not be inferred with a (1, 3, 64, 64) dry run of the trunk "
                             f"({type(exc).__name__}: {exc}); pass channels=") from exc
        finally:
            self.trunk.train(was)
        if not isinstance(f, Tensor) or f.dim() != 4:
            got = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
            raise ValueError(f"trunk must return a feature map (B, C, h, w), got {got}")
        return int(f.shape[1])

    @property
    def device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        return torch.device("cpu")

    def forward(self, images: Tensor) -> AttributeOutput:
        """Attribute maps, logits and confidences (:class:`AttributeOutput`) of images (B, 3, H, W) in [0, 1]."""
        V.tensor("images", images, ndim=4, dtypes=V.FLOAT_DTYPES)
        x = images if self.preprocess is None else self.preprocess(images)
        f = self.trunk(x)
        if not isinstance(f, Tensor) or f.dim() != 4 or f.shape[1] != self.channels:
            got = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
            raise ValueError(f"trunk must return a feature map (B, {self.channels}, h, w), got {got}")
        maps = self.conv(f).float()
        logits = maps.mean(dim=(2, 3))
        return AttributeOutput(maps, logits, F.softmax(logits, dim=1))


# ------------------------------------------------------------------ trunks
class _ShapesTrunk(nn.Module):
    """ShapesCNN's conv trunk (layer1..layer4, normalization inside), as a feature-map module."""

    def __init__(self) -> None:
        super().__init__()
        from ..models import ShapesCNN

        self.net = ShapesCNN()
        self.net.fc = nn.Identity()  # unused: no parameter DDP would wait for

    def forward(self, x: Tensor) -> Tensor:
        return self.net.feature_maps(x)


class _ResNetTrunk(nn.Module):
    """A whymatch ResNet up to layer4 (no pooling): (B, 3, H, W) -> (B, C, H/32, W/32)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        from ..models.resnet import resnet18, resnet50

        self.net = resnet18(embedding=True) if name == "resnet18" else resnet50(embedding=True)

    def forward(self, x: Tensor) -> Tensor:
        n = self.net
        return n.layer4(n.layer3(n.layer2(n.layer1(n.stem(x)))))


class _ImageNetNormalize(nn.Module):
    """(x - ImageNet mean) / ImageNet std, for images in [0, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


def build_attribute_model(backbone: str = "shapes", n_attributes: int = 18, *,
                          attribute_names: Sequence[str] | None = None, kernel_size: int = 3) -> AttributeModel:
    """A randomly initialized :class:`AttributeModel` on a whymatch trunk (nothing is downloaded).

    Args:
        backbone: 'shapes' (:class:`whymatch.models.ShapesCNN`'s conv trunk, 128 channels at
            H/8; its own normalization), 'resnet18' (512 channels at H/32) or 'resnet50'
            (2048 channels at H/32, SANE's trunk), the ResNets with ImageNet mean/std preprocessing.
        n_attributes: A (18 for ShapesWorld's ``ATTRIBUTE_NAMES``).
        attribute_names: optional A names.
        kernel_size: of the attribute convolution (SANE: 3).

    Returns:
        An AttributeModel in train mode whose ``config`` rebuilds it.
    """
    V.choice("backbone", backbone, ATTRIBUTE_BACKBONES)
    if backbone == "shapes":
        trunk: nn.Module = _ShapesTrunk()
        channels, pre = trunk.net.layer4[-2].num_features, None
    else:
        trunk = _ResNetTrunk(backbone)
        channels, pre = trunk.net.feature_dim, _ImageNetNormalize()
    model = AttributeModel(trunk, n_attributes, channels=channels, attribute_names=attribute_names,
                           kernel_size=kernel_size, preprocess=pre)
    model.config = {"backbone": backbone, "n_attributes": model.n_attributes, "kernel_size": model.kernel_size}
    return model


# ------------------------------------------------------------------ saving and loading
def attribute_model_state(model: AttributeModel, **extra: object) -> dict:
    """A ``weights_only``-loadable dict that :func:`load_attribute_model` rebuilds the model from.

    Args:
        model: a model made by :func:`build_attribute_model` (its ``config`` names the trunk).
        extra: JSON-like values stored alongside (epoch, mAP, training settings).

    Returns:
        {'format', 'state_dict', 'attribute_names', 'config', **extra}, tensors on the CPU.
    """
    if not isinstance(model, AttributeModel):
        raise TypeError(f"model must be an AttributeModel, got {type(model).__name__}")
    if not model.config:
        raise ValueError("model must come from build_attribute_model (its config rebuilds it); "
                         "save a custom model's state_dict() yourself")
    state = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    return {"format": _FORMAT, "state_dict": state, "attribute_names": list(model.attribute_names),
            "config": dict(model.config), **extra}


def load_attribute_model(path: str | Path, device: str | torch.device = "cpu") -> AttributeModel:
    """Rebuild an :class:`AttributeModel` from a file written with :func:`attribute_model_state`.

    Args:
        path: the file (model.pt / best.pt of ``whymatch train sane``, or the shipped weights).
        device: where to put the model.

    Returns:
        The model in eval mode.
    """
    from ..io import FileFormatError, load_torch_file
    from ..train.checkpoint import check_tensor_dict, check_tensors_match

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"attribute model file not found: {p}" + (" (a directory)" if p.is_dir() else ""))
    blob = load_torch_file(p, "attribute model file")
    if not isinstance(blob, dict) or blob.get("format") != _FORMAT or "state_dict" not in blob:
        raise FileFormatError(f"{p} is not an attribute model file (format {_FORMAT} with a state_dict, "
                              "as written by whymatch.attributes.model.attribute_model_state)")
    for key, kind in (("config", dict), ("attribute_names", list)):
        if not isinstance(blob.get(key), kind):
            raise FileFormatError(f"attribute model file {p}: entry {key!r} must be a {kind.__name__}, "
                                  f"got {type(blob.get(key)).__name__}")
    cfg, names = blob["config"], blob["attribute_names"]
    if any(not isinstance(n, str) for n in names):
        raise FileFormatError(f"attribute model file {p}: 'attribute_names' must be strings")
    for key, required in (("backbone", True), ("n_attributes", True), ("kernel_size", False)):
        v = cfg.get(key)
        if v is None and not required:
            continue
        ok = isinstance(v, str) if key == "backbone" else (isinstance(v, int) and not isinstance(v, bool) and v >= 1)
        if not ok:
            raise FileFormatError(f"attribute model file {p}: config[{key!r}] must be "
                                  f"{'a backbone name' if key == 'backbone' else 'a positive int'}, got {v!r}")
    if cfg["backbone"] not in ATTRIBUTE_BACKBONES:
        raise FileFormatError(f"attribute model file {p}: config['backbone'] must be one of "
                              f"{', '.join(ATTRIBUTE_BACKBONES)}, got {cfg['backbone']!r}")
    if len(names) != cfg["n_attributes"]:
        raise FileFormatError(f"attribute model file {p}: {len(names)} attribute names for "
                              f"config['n_attributes'] = {cfg['n_attributes']}")
    try:
        model = build_attribute_model(cfg["backbone"], cfg["n_attributes"], attribute_names=names,
                                      kernel_size=cfg.get("kernel_size", 3))
        state = check_tensor_dict("its state_dict", blob["state_dict"])
        check_tensors_match("its state_dict", state, model.state_dict(), "another backbone or attribute count")
        model.load_state_dict(state)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise FileFormatError(f"attribute model file {p}: {str(exc).splitlines()[0] if str(exc) else exc!r}") \
            from None
    return model.to(device).eval()


def default_attribute_weights_path() -> Path:
    """Filesystem path of the shipped ShapesWorld attribute weights (where they belong when missing)."""
    from ..models._shipped import shipped_path

    return shipped_path(WEIGHTS_RESOURCE)

def load_default_attribute_model(device: str | torch.device = "cpu") -> AttributeModel:
    """The shipped ShapesWorld attribute model (ShapesCNN trunk, 18 attributes), nothing downloaded.

    Args:
        device: where to put the model.

    Returns:
        An :class:`AttributeModel` in eval mode, ``attribute_names`` =
        :data:`whymatch.data.shapesworld.ATTRIBUTE_NAMES`, taking (B, 3, 96, 96) images
        in [0, 1]; maps (B, 18, 12, 12).

    Raises:
        FileNotFoundError: the weights file is missing (it is written by
            ``python scripts/train_shapesworld_attributes.py``).
    """
    from ..models._shipped import open_shipped

    with open_shipped(WEIGHTS_RESOURCE, "ShapesWorld attribute model weights", TRAIN_SCRIPT) as path:
        return load_attribute_model(path, device)
