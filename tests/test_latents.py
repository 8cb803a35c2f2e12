"""Packing, ids and shift helpers shared by the pipeline and training."""

import mindspore as ms
import numpy as np

from mindflux.latents import (
    calculate_shift,
    latent_size,
    pack_latents,
    prepare_latent_image_ids,
    unpack_latents,
)


def test_pack_unpack_roundtrip_and_token_layout():
    x = np.random.default_rng(0).standard_normal((2, 4, 6, 10)).astype(np.float32)  # 48 x 80 pixels
    packed = pack_latents(ms.Tensor(x))
    assert packed.shape == (2, 3 * 5, 16)
    # token (row 1, col 2) holds channel c's 2x2 patch at [2:4, 4:6], channels-major
    np.testing.assert_array_equal(packed.asnumpy()[0, 1 * 5 + 2].reshape(4, 2, 2), x[0, :, 2:4, 4:6])
    np.testing.assert_array_equal(unpack_latents(packed, 48, 80).asnumpy(), x)


def test_ids_and_sizes():
    ids = prepare_latent_image_ids(2, 3).asnumpy()
    np.testing.assert_array_equal(ids, [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 1, 2]])
    assert latent_size(1024, 768) == (128, 96)
    assert latent_size(1000, 1000) == (124, 124)  # rounded down to whole 2x2 patches


def test_shift_endpoints():
    assert abs(calculate_shift(256) - 0.5) < 1e-12 and abs(calculate_shift(4096) - 1.15) < 1e-12
