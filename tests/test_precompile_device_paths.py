"""The Ascend and GPU branches compiled on the CPU: MS_DEV_PRECOMPILE_ONLY=1 with the device policy forced.

With MS_DEV_PRECOMPILE_ONLY=1, graph mode parses `construct`, infers every dtype and shape and returns None
instead of running. Forcing the policy (`mindflux.backend.force_device`) makes the models take the Ascend or
GPU choices (flash attention, fp32 RoPE, MindSpore's LayerNorm, half-precision weights), so a wrong argument
name, dtype or shape in a device branch fails here, on the CPU, in CI. Each test was seen to fail with a
planted bug; the messages are in the docstrings. (A half-precision matmul has no CPU kernel, but kernels are
selected only when a graph runs, which precompilation never does.)
"""

from __future__ import annotations

import os

import mindspore as ms
import numpy as np
import pytest

import mindflux
from mindflux import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
from mindflux.backend import force_device
from mindflux.lora import LoraConfig
from mindflux.training import FluxFlowMatchingLoss, create_optimizer
from mindflux.training.train_step import UpdateStep
from tests.conftest import FIXTURES
from tests.tiny_flux import TEXT_LEN, TRANSFORMER_CONFIG, make_model_folder

A2 = ("Ascend", "Ascend910B1")


@pytest.fixture
def precompile():
    """Graph mode with MS_DEV_PRECOMPILE_ONLY=1 (read by MindSpore at each compile), restored afterwards."""
    mindflux.set_device("cpu", "graph")
    os.environ["MS_DEV_PRECOMPILE_ONLY"] = "1"
    yield
    del os.environ["MS_DEV_PRECOMPILE_ONLY"]
    mindflux.set_device("cpu", "pynative")


def transformer_inputs(dtype, batch: int = 1, side: int = 4):
    rng = np.random.default_rng(0)
    seq = side * side
    ids = np.zeros((seq, 3), np.float32)
    ids[:, 1], ids[:, 2] = np.divmod(np.arange(seq), side)
    return dict(hidden_states=ms.Tensor(rng.standard_normal((batch, seq, 64)), dtype),
                encoder_hidden_states=ms.Tensor(rng.standard_normal((batch, TEXT_LEN, 32)), dtype),
                pooled_projections=ms.Tensor(rng.standard_normal((batch, 16)), dtype),
                timestep=ms.Tensor(np.full(batch, 0.5, np.float32)), img_ids=ms.Tensor(ids),
                txt_ids=ms.Tensor(np.zeros((TEXT_LEN, 3), np.float32)),
                guidance=ms.Tensor(np.full(batch, 3.5, np.float32)))


def tiny_transformer(dtype) -> FluxTransformer2DModel:
    return FluxTransformer2DModel(**TRANSFORMER_CONFIG).to(dtype)


def test_precompile_transformer_forward_ascend_bf16(precompile):
    """A bf16 transformer built on the CPU, then compiled under the Atlas A2 policy: flash attention, fp32 RoPE.

    Planted bug (flash_attention's `input_layout=` misspelt `layout=`), seen failing:
    RuntimeError: Got an unexpected keyword argument 'layout'
    """
    transformer = tiny_transformer(ms.bfloat16)
    block = transformer.transformer_blocks[0]
    assert block.attn.backend == "math" and block.norm2.use_plain  # the CPU's choices, at build time
    with force_device(*A2):
        # the model was built before the device changed: it follows the new policy, no silent mismatch
        assert block.attn.backend == "flash" and transformer.single_transformer_blocks[0].attn.backend == "flash"
        assert transformer.pos_embed.freqs.dtype == ms.float32 and not block.norm2.use_plain
        assert transformer(**transformer_inputs(ms.bfloat16), return_dict=False) is None  # compiled, not run
    assert block.attn.backend == "math" and transformer.pos_embed.freqs.dtype == ms.float64  # back on the CPU


@pytest.mark.parametrize("recompute", [False, True])
def test_precompile_lora_train_step_ascend_bf16(precompile, recompute):
    """A LoRA UpdateStep (bf16 frozen weights, fp32 LoRA computing in bf16, flash attention, clip, AdamW) on
    Atlas A2, with and without recompute.

    Planted bug (flash_attention given the sequence axis as head_num, query.shape[2]), seen failing with
    recompute: RuntimeError: FlashAttentionScore: query_shape[1] must be equal to attribute 'head_num', but
    got 2 and 23
    """
    with force_device(*A2):
        transformer = tiny_transformer(ms.float32).freeze()
        transformer.to(ms.bfloat16)
        transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        if recompute:
            transformer.enable_gradient_checkpointing()
        assert {p.dtype for p in transformer.lora_parameters()} == {ms.float32}
        loss_net = FluxFlowMatchingLoss(transformer)
        optimizer = create_optimizer("AdamW", transformer.lora_parameters(), weight_decay=1e-4)
        step = UpdateStep(loss_net, optimizer.parameters, None, 1, None, optimizer, 1.0, 1)
        step.set_train(True)
        x = transformer_inputs(ms.bfloat16)
        rng = np.random.default_rng(1)
        latents = ms.Tensor(rng.standard_normal((1, 16, 8, 8)), ms.bfloat16)
        noise = ms.Tensor(rng.standard_normal((1, 16, 8, 8)), ms.float32)
        sigmas = ms.Tensor(np.full(1, 0.5, np.float32))
        out = step(ms.Tensor(1e-4, ms.float32), latents, noise, sigmas, sigmas, x["encoder_hidden_states"],
                   x["pooled_projections"], x["img_ids"], x["txt_ids"], x["guidance"])
        assert out is None


def test_precompile_vae_ascend_bf16(precompile):
    """The tiny VAE in bf16 on Atlas A2: encode and decode, the mid-block attention on the flash kernel.

    Planted bug (the VAE attention's value projection cast to fp32, `.astype("float32")`), seen failing:
    TypeError: For primitive[FlashAttentionScore], the input type must be same. name:[key]:Tensor[BFloat16].
    name:[query]:Tensor[BFloat16]. name:[value]:Tensor[Float32].
    """
    vae = AutoencoderKL.from_pretrained(str(FIXTURES / "vae" / "tiny"), mindspore_dtype=ms.bfloat16)
    with force_device(*A2):
        attention = vae.encoder.mid_block.attentions[0]
        assert attention.backend == "flash"
        image = ms.Tensor(np.zeros((1, 3, 16, 16), np.float32), ms.bfloat16)
        assert vae.encoder(image) is None
        channels = vae.config.latent_channels
        assert vae.decoder(ms.Tensor(np.zeros((1, channels, 8, 8), np.float32), ms.bfloat16)) is None


def test_precompile_pipeline_denoising_step_ascend_fp16(precompile, tmp_path, monkeypatch):
    """One FluxPipeline denoising step on Atlas A2: the transformer called exactly as the pipeline calls it
    (its latents, ids, timestep and guidance), compiled with flash attention; the scheduler sees the None it
    returns. fp16, not bf16: the pipeline's own op-by-op arithmetic (timestep / 1000) really runs on the CPU,
    which has no bf16 Div kernel; the transformer test above covers bf16.

    Planted bug (the pipeline building `timestep` as (B, 1)), seen failing at compile time:
    ValueError: '`timestep` must be a scalar or (1,); got (1, 1)'
    """
    pipe = FluxPipeline.from_pretrained(str(make_model_folder(tmp_path / "model")), mindspore_dtype=ms.float16)
    seen = []

    class Compiled:
        """The pipeline's transformer, its precompiled None returned as the `(sample,)` the loop indexes."""

        def __init__(self, transformer):
            self.transformer = transformer

        def __getattr__(self, name):
            return getattr(self.transformer, name)

        def __call__(self, **kwargs):
            return (self.transformer(**kwargs),)

    def step(noise_pred, t, latents, return_dict=True):
        seen.append(noise_pred)
        return (latents,)

    monkeypatch.setattr(pipe, "transformer", Compiled(pipe.transformer))
    monkeypatch.setattr(pipe.scheduler, "step", step)
    rng = np.random.default_rng(0)
    with force_device(*A2):
        assert pipe.transformer.transformer_blocks[0].attn.backend == "flash"
        pipe(prompt_embeds=rng.standard_normal((1, TEXT_LEN, 32)).astype(np.float32),
             pooled_prompt_embeds=rng.standard_normal((1, 16)).astype(np.float32), height=16, width=16,
             num_inference_steps=1, output_type="latent")
    assert seen == [None]


def test_precompile_transformer_forward_gpu_fp16(precompile):
    """The GPU path: fp16 weights, math attention (no flash kernel there), fp64 RoPE, fp16 residual clamp.

    Planted bug (_clip_fp16 clamping with `ops.clamp(x, min=..., maxi=...)`), seen failing:
    RuntimeError: Got an unexpected keyword argument 'maxi'
    """
    with force_device("GPU"):
        transformer = tiny_transformer(ms.float16)
        assert transformer.transformer_blocks[0].attn.backend == "math"
        assert transformer.pos_embed.freqs.dtype == ms.float64
        assert transformer(**transformer_inputs(ms.float16), return_dict=False) is None


def test_precompile_fails_on_a_wrong_argument(precompile, monkeypatch):
    """The check itself: a flash-attention call with a wrong argument name or mismatched dtypes must fail."""
    from mindflux.backend import attention

    transformer = tiny_transformer(ms.bfloat16)

    def wrong_name(query, key, value, scale):
        return ms.ops.flash_attention_score(query, key, value, query.shape[1], layout="BNSD", scalar_value=scale)

    monkeypatch.setattr(attention, "flash_attention", wrong_name)
    with force_device(*A2), pytest.raises(Exception, match="unexpected keyword argument 'layout'"):
        transformer(**transformer_inputs(ms.bfloat16), return_dict=False)

    def wrong_dtype(query, key, value, scale):
        return ms.ops.flash_attention_score(query, key, value.astype(ms.float32), query.shape[1],
                                            input_layout="BNSD", scalar_value=scale)

    monkeypatch.setattr(attention, "flash_attention", wrong_dtype)
    with force_device(*A2), pytest.raises(TypeError, match="FlashAttentionScore"):
        tiny_transformer(ms.bfloat16)(**transformer_inputs(ms.bfloat16), return_dict=False)
