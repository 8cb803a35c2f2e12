"""Compile-time measures that run without a device: lazy_inline's reuse keys for the transformer blocks."""


from mindflux.backend import force_device
from mindflux.lora import LoraConfig
from mindflux.models import transformer_flux
from mindflux.models.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock


def test_blocks_are_reused_on_ascend_only_and_lora_layouts_split_the_key():
    # on the CPU the blocks are inlined as before: MindSpore's CPU backend rejects lazy_inline's graphs
    assert not hasattr(FluxTransformerBlock(32, 2, 16), "cell_init_args")
    with force_device("Ascend", "Ascend910B1"):  # the policy turns lazy_inline on for Ascend
        model = transformer_flux.FluxTransformer2DModel(
            patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=8, pooled_projection_dim=8, axes_dims_rope=[4, 6, 6])
    double, single = model.transformer_blocks, model.single_transformer_blocks
    assert isinstance(single[0], FluxSingleTransformerBlock)
    keys = [b.cell_init_args for b in (*double, *single)]
    assert keys[0] == keys[1] and keys[2] == keys[3] and keys[0] != keys[2]  # one graph per block class
    assert keys[0].startswith("lazy_inline_FluxTransformerBlock")
    # a LoRA whose rank differs between the two double blocks must not share their compiled graph
    model.add_adapter(LoraConfig(r=4, target_modules=["attn.to_q"],
                                 rank_pattern={"transformer_blocks.1.attn.to_q": 2}))
    assert double[0].cell_init_args != double[1].cell_init_args
    assert single[0].cell_init_args == single[1].cell_init_args != keys[2]  # same layout: still shared
    assert "(4, 32)" in double[0].cell_init_args and "(2, 32)" in double[1].cell_init_args


def test_tiles_compile_one_graph_in_graph_mode_with_diffusers_numbers(graph_mode):
    """Tiled encode/decode take a dynamic-shape input in graph mode (one compile for the edge tiles too);
    the numbers stay diffusers' (the fixture test of test_autoencoder_kl.py runs PyNative)."""
    from mindflux import AutoencoderKL
    from tests.conftest import max_abs_diff
    from tests.test_autoencoder_kl import CASES, DUMPS, IMAGE, LATENTS, TILE_SAMPLE, TOL

    vae = AutoencoderKL.from_pretrained(str(DUMPS / "tiny"))
    vae.enable_tiling(tile_sample_min_size=TILE_SAMPLE)
    assert max_abs_diff(vae.decode(LATENTS).sample, CASES["tiny_tiled.decoded"]) <= TOL
    assert max_abs_diff(vae.encode(IMAGE).latent_dist.mean, CASES["tiny_tiled.mean"]) <= TOL
    assert vae.decoder.get_inputs() is None and vae.encoder.get_inputs() is None  # untiled calls stay static
    vae.disable_tiling()
    assert max_abs_diff(vae.decode(LATENTS).sample, CASES["tiny.decoded"]) <= TOL
