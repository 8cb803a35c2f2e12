"""Which pipeline a model folder and a set of inputs call for (generate.py's --image / --mask_image /
--control_image): the family member follows from model_index.json and the transformer's x_embedder width.

    model                     no image     --image           --image --mask_image   --control_image
    FLUX.1-dev / schnell      FluxPipeline FluxImg2Img       FluxInpaint            (a control LoRA: FluxControl)
    FLUX.1-Kontext-dev        FluxKontext  FluxKontext       -                      -
    FLUX.1-Fill-dev           -            -                 FluxFill               -
    FLUX.1-Canny / Depth-dev  -            -                 -                      FluxControl
"""

from __future__ import annotations

import json
import os

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


__all__ = ["model_family", "pipeline_class_for"]
