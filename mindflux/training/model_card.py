"""The README.md model card written next to a trained LoRA (Hugging Face model-card layout: YAML front
matter, then Markdown), with the base model, the trigger prompt, how to load it, the training
arguments and the validation images."""

from __future__ import annotations

import json
import os
from typing import Any

# arguments that say nothing about the result (paths of this machine, logging, launch details)
_SKIPPED = {"output_dir", "logging_dir", "report_to", "hub_token", "local_rank", "cache_dir",
            "resume_from_checkpoint", "dataloader_num_workers"}


def _yaml_string(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid YAML scalar


def write_model_card(output_dir: str, args: dict[str, Any], images: list[str] | None = None,
                     validation_prompt: str | None = None, steps: int | None = None,
                     kohya_file: str | None = None, weight_name: str = "pytorch_lora_weights.safetensors",
                     pipeline_class: str = "FluxPipeline", title: str = "FLUX DreamBooth LoRA") -> str:
    """Write `output_dir/README.md`; `images` are paths relative to output_dir. Returns the card's path."""
    base_model = str(args.get("pretrained_model_name_or_path"))
    instance_prompt = str(args.get("instance_prompt"))
    widget = "".join(f"  - text: {_yaml_string(validation_prompt or instance_prompt)}\n"
                     f"    output:\n      url: {_yaml_string(path)}\n" for path in images or [])
    front = ("---\n"
             f"base_model: {_yaml_string(base_model)}\n"
             "library_name: diffusers\n"
             "license: other\n"
             f"instance_prompt: {_yaml_string(instance_prompt)}\n"
             "tags:\n" + "".join(f"  - {t}\n" for t in ("text-to-image", "diffusers-training", "diffusers", "lora",
                                                         "flux", "flux-diffusers", "mindflux", "template:sd-lora"))
             + (f"widget:\n{widget}" if widget else "") + "---\n")
    prompt = validation_prompt or instance_prompt
    lines = [
        f"# {title} - {os.path.basename(os.path.abspath(output_dir))}",
        "",
        f"LoRA weights for `{base_model}`, trained with DreamBooth by mindflux "
        "(train/train_dreambooth_lora_flux.py, MindSpore)" + (f" for {steps} steps." if steps else "."),
        "",
        f"Text encoder LoRA: {bool(args.get('train_text_encoder'))}.",
        "",
        "## Trigger words",
        "",
        f"Use `{instance_prompt}` in the prompt to trigger the subject.",
        "",
        "## Files",
        "",
        f"- `{weight_name}`: diffusers format (transformer. / text_encoder. keys, adapter config in the metadata)",
    ]
    if kohya_file:
        lines.append(f"- `{kohya_file}`: kohya format, for ComfyUI and other kohya readers")
    lines += [
        "",
        "## Use it with diffusers (PyTorch)",
        "",
        "```py",
        "import torch",
        f"from diffusers import {pipeline_class}",
        f"pipe = {pipeline_class}.from_pretrained({base_model!r}, torch_dtype=torch.bfloat16).to('cuda')",
        f"pipe.load_lora_weights('<this folder>', weight_name={weight_name!r})",
        f"image = pipe({prompt!r}).images[0]",
        "```",
        "",
        "## Use it with mindflux (MindSpore)",
        "",
        "```py",
        f"from mindflux.pipelines import {pipeline_class}",
        f"pipe = {pipeline_class}.from_pretrained({base_model!r}, mindspore_dtype='bf16')",
        "pipe.load_lora_weights('<this folder>')",
        f"image = pipe({prompt!r}).images[0]",
        "```",
    ]
    if images:
        lines += ["", "## Validation images", "", f"Prompt: `{prompt}`", ""]
        lines += [f"![{os.path.basename(p)}]({p})" for p in images]
    lines += ["", "## Training arguments", "", "| argument | value |", "| --- | --- |"]
    for key in sorted(args):
        if key in _SKIPPED or args[key] is None or args[key] is False:
            continue
        value = str(args[key]).replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `--{key}` | `{value}` |")
    lines += ["", "## License", "",
              "Follow the license of the base model (FLUX.1-dev: the FLUX.1 [dev] Non-Commercial License).", ""]
    path = os.path.join(output_dir, "README.md")
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(front + "\n" + "\n".join(lines))
    os.replace(tmp, path)
    return path
