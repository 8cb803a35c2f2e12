"""Which pipeline a model folder and a set of inputs call for (generate.py's --image / --mask_image /
--control_image): the family member follows from model_index.json and the transformer's x_embedder width.

    model                     no image     --image           --image --mask_image   --control_image
    FLUX.1-dev / schnell      FluxPipeline FluxImg2Img       FluxInpaint            (a control LoRA: FluxControl)
    FLUX.1-Kontext-dev        FluxKontext  FluxKontext       -                      -
    FLUX.1-Fill-dev           -            -                 FluxFill               -
    FLUX.1-Canny / Depth-dev  -            -                 -                      FluxControl
"""

from __future__ import annotations

import hashlib
import json
import os

from .. import image_processor
from .flux import FluxPipeline
from .flux_control import FluxControlPipeline
from .flux_fill import FluxFillPipeline
from .flux_img2img import FluxImg2ImgPipeline
from .flux_inpaint import FluxInpaintPipeline
from .flux_kontext import FluxKontextPipeline
from .pipeline_utils import DiffusionPipeline


def model_family(folder: str | os.PathLike) -> str:
    """"fill", "control", "kontext" or "dev" (dev and schnell) for a pipeline folder."""
    index = DiffusionPipeline.load_model_index(str(folder))
    config = os.path.join(str(folder), "transformer", "config.json")
    in_channels = None
    if os.path.isfile(config):
        with open(config, encoding="utf-8") as f:
            in_channels = json.load(f).get("in_channels")
    name = index.get("_class_name", "")
    if in_channels == FluxFillPipeline.in_channels_for() or name == "FluxFillPipeline":
        return "fill"
    if in_channels == FluxControlPipeline.in_channels_for() or name == "FluxControlPipeline":
        return "control"
    return "kontext" if name == "FluxKontextPipeline" else "dev"


def pipeline_class_for(folder: str | os.PathLike, image: bool = False, mask_image: bool = False,
                       control_image: bool = False, control_lora: bool = False) -> type[FluxPipeline]:
    """The pipeline class for `folder` given which inputs there are; a ValueError naming the flag that does not
    fit the model. `control_lora`: LoRAs will be loaded that may widen a dev model for control images."""
    family = model_family(folder)
    if mask_image and not image:
        raise ValueError("--mask_image needs --image (the picture the mask applies to)")
    if control_image and (image or mask_image):
        raise ValueError("--control_image does not combine with --image / --mask_image")
    if family == "fill":
        if not (image and mask_image):
            raise ValueError(f"{folder} is a FLUX.1-Fill model: give --image and --mask_image")
        return FluxFillPipeline
    if family == "control":
        if not control_image:
            raise ValueError(f"{folder} is a FLUX.1 control (Canny / Depth) model: give --control_image")
        return FluxControlPipeline
    if family == "kontext":
        if mask_image or control_image:
            raise ValueError(f"{folder} is a FLUX.1-Kontext model: it takes --image only "
                             f"(not --{'mask_image' if mask_image else 'control_image'})")
        return FluxKontextPipeline
    if control_image:
        if not control_lora:
            raise ValueError(f"--control_image needs a control model (FLUX.1-Canny-dev / Depth-dev) or a Canny / "
                             f"Depth control LoRA (--lora) on {folder}")
        return FluxControlPipeline
    if mask_image:
        return FluxInpaintPipeline
    return FluxImg2ImgPipeline if image else FluxPipeline


def image_arguments(image: str | None = None, mask_image: str | None = None, control_image: str | None = None,
                    strength: float | None = None, height: int | None = None,
                    width: int | None = None) -> tuple[dict, dict]:
    """Image files of a generation checked and read before any model work: (call arguments with PIL images, PNG
    metadata with each file's SHA-256 and the strength). A ValueError names the flag and file at fault.

    height / width default to the input image's size, rounded down to 16 (diffusers' pipelines would use 1024)."""
    if strength is not None and not 0 <= strength <= 1:
        raise ValueError(f"--strength must be in [0, 1]; got {strength}")
    if strength is not None and image is None:
        raise ValueError("--strength needs --image")
    call, metadata = {}, {}
    for flag, path in (("image", image), ("mask_image", mask_image), ("control_image", control_image)):
        if path is None:
            continue
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as err:
            raise ValueError(f"--{flag} {path}: cannot read it ({err.strerror or err})") from None
        call[flag] = image_processor.load_image(path, f"--{flag}")
        metadata[f"{flag}_sha256"] = hashlib.sha256(data).hexdigest()
    if "image" in call and "mask_image" in call and call["image"].size != call["mask_image"].size:
        raise ValueError(f"--mask_image {mask_image} is {call['mask_image'].size[0]}x{call['mask_image'].size[1]} "
                         f"but --image {image} is {call['image'].size[0]}x{call['image'].size[1]}; they must match")
    if strength is not None:
        call["strength"] = metadata["strength"] = strength
    first = call.get("image", call.get("control_image"))
    if first is not None:
        height, width = image_processor.default_height_width(first, height, width)
    call.update(height=height, width=width)
    return call, metadata


def call_arguments_for(pipeline_class: type, arguments: dict) -> dict:
    """`arguments` without those the pipeline does not take (e.g. strength for Kontext), as a CLI needs."""
    import inspect

    accepted = set(inspect.signature(pipeline_class.__call__).parameters) | \
        set(inspect.signature(FluxPipeline.__call__).parameters)
    return {k: v for k, v in arguments.items() if k in accepted}


__all__ = ["call_arguments_for", "image_arguments", "model_family", "pipeline_class_for"]
