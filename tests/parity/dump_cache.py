"""Reference images of diffusers' FluxPipeline with a first-block cache (issue 16, section 1).

Topic "cache" writes tests/fixtures/cache/:
  cases.safetensors   per case: initial latents, prompt embeddings, the cached images (np, fp32), the
                      uncached images of the same call, and for each context ("cond", "uncond") the
                      steps diffusers skipped (int64) and the relative change it compared (nan at step 0)
  cases.json          the call arguments and the FirstBlockCacheConfig threshold of each case
It runs the tiny pipeline of topic "pipeline" (tests/fixtures/pipeline/tiny_flux). Its random blocks
change more from step to step than a trained FLUX's, so the thresholds are higher than one would use
on FLUX.1; each is checked to stay clear of every compared change, so that rounding cannot flip a
decision.
"""

from __future__ import annotations

import json
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

PROMPTS = ["a red circle on a white background", "two small blue triangles in the top left corner"]
CASES = {
    # FLUX.1-dev guidance, a batch of two prompts, 20 steps
    "dev": dict(call=dict(height=64, width=64, num_inference_steps=20, guidance_scale=3.5),
                prompt=PROMPTS, latents=[2, 16, 64], threshold=0.25),
    # true CFG: the negative pass keeps its own cache state ("uncond")
    "cfg": dict(call=dict(height=48, width=64, num_inference_steps=12, guidance_scale=2.0, true_cfg_scale=4.0),
                prompt=PROMPTS[1], negative_prompt="blurry, low quality", latents=[1, 12, 64], threshold=0.4),
}
MAX_SEQUENCE_LENGTH = 32
MARGIN = 0.01  # every compared change is at least this far from the threshold


def pipeline_folder(out: Path) -> Path:
    """The tiny pipeline regenerated in this run if there is one, else the committed one."""
    fresh = out.parent / "pipeline" / "tiny_flux"
    return fresh if (fresh / "model_index.json").is_file() else FIXTURES / "pipeline" / "tiny_flux"


def make_reference(out: Path) -> None:
    import numpy as np
    import torch
    from diffusers import FirstBlockCacheConfig, FluxPipeline
    from diffusers.hooks import first_block_cache

    from .torch_common import save_arrays, seed

    # Record each decision of diffusers' head-block hook: the context, and the change it compared.
    decisions = []
    decide = first_block_cache.FBCHeadBlockHook._should_compute_remaining_blocks

    def recording(hook, residual):
        state = hook.state_manager.get_state()
        previous = state.head_block_residual
        change = float("nan") if previous is None else \
            float((residual - previous).abs().mean() / previous.abs().mean())
        compute = decide(hook, residual)
        decisions.append((hook.state_manager._current_context, change, compute))
        return compute

    first_block_cache.FBCHeadBlockHook._should_compute_remaining_blocks = recording

    generator = seed(1600)
    pipe = FluxPipeline.from_pretrained(str(pipeline_folder(out)), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    arrays = {}
    for name, case in CASES.items():
        latents = torch.randn(case["latents"], generator=generator)
        with torch.no_grad():
            embeds, pooled, _ = pipe.encode_prompt(case["prompt"], prompt_2=None,
                                                   max_sequence_length=MAX_SEQUENCE_LENGTH)
            call = dict(case["call"], prompt_embeds=embeds, pooled_prompt_embeds=pooled, latents=latents,
                        output_type="np")
            if "negative_prompt" in case:
                neg, neg_pooled, _ = pipe.encode_prompt(case["negative_prompt"], prompt_2=None,
                                                        max_sequence_length=MAX_SEQUENCE_LENGTH)
                call.update(negative_prompt_embeds=neg, negative_pooled_prompt_embeds=neg_pooled)
                arrays.update({f"{name}.negative_prompt_embeds": neg, f"{name}.negative_pooled_prompt_embeds":
                               neg_pooled})
            uncached = pipe(**call).images
            pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=case["threshold"]))
            decisions.clear()
            images = pipe(**call).images
            pipe.transformer.disable_cache()
        for context in sorted({c for c, _, _ in decisions}):
            mine = [(change, compute) for c, change, compute in decisions if c == context]
            changes = np.array([change for change, _ in mine])
            skipped = np.array([i for i, (_, compute) in enumerate(mine) if not compute], np.int64)
            clearance = np.nanmin(np.abs(changes - case["threshold"]))
            assert clearance >= MARGIN, (name, context, clearance, changes.round(3).tolist())
            assert len(skipped) >= 3, (name, context, skipped)  # several steps skipped
            arrays.update({f"{name}.{context}.skipped": skipped, f"{name}.{context}.changes": changes})
        difference = float(np.abs(images - uncached).max())
        assert difference > 2 / 255, (name, difference)  # well above the 0.5/255 parity bound
        arrays.update({f"{name}.latents": latents, f"{name}.prompt_embeds": embeds,
                       f"{name}.pooled_prompt_embeds": pooled, f"{name}.images": torch.from_numpy(images),
                       f"{name}.uncached_images": torch.from_numpy(uncached)})
    save_arrays(out / "cases.safetensors", arrays)
    (out / "cases.json").write_text(json.dumps(CASES, indent=1) + "\n", encoding="utf-8")
