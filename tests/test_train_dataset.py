"""mindflux.training.dataset: captions, image decoding, buckets, per-step flips and caption drops, epoch order."""

import json

import numpy as np
import pytest
from PIL import Image

from mindflux.training.dataset import (
    DataError,
    DreamBoothDataset,
    load_image,
    nearest_bucket,
    parse_buckets,
    read_folder_captions,
    resize_and_crop,
    to_pixels,
)


def gradient(width: int, height: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    return (rng.uniform(0, 255, 3) * (xx[..., None] + 2 * yy[..., None]) / (width + 2 * height)).astype(np.uint8)


def save(folder, name, array, **kwargs):
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(folder / name, **kwargs)
    return folder / name


def test_captions_from_txt_files_fall_back_to_the_instance_prompt(tmp_path):
    for i in range(3):
        save(tmp_path, f"{i}.png", gradient(20, 20, i))
    (tmp_path / "0.txt").write_text("  a photo of sks dog on grass \n", encoding="utf-8")
    (tmp_path / "1.txt").write_text("", encoding="utf-8")  # empty: the instance prompt, as diffusers
    data = DreamBoothDataset(str(tmp_path), "sks dog", 16, center_crop=True, repeats=2)
    assert data.captions == ["a photo of sks dog on grass"] * 2 + ["sks dog"] * 4
    assert len(data) == 6 and data.custom_instance_prompts
    assert [data.image_id(i) for i in range(6)] == [0, 0, 1, 1, 2, 2]
    np.testing.assert_array_equal(data.instance(1), data.instance(0))


def test_metadata_jsonl_with_columns(tmp_path):
    save(tmp_path / "sub", "a.jpg", gradient(24, 16))
    save(tmp_path, "b.png", gradient(16, 24))
    save(tmp_path, "unlisted.png", gradient(16, 16))
    lines = [{"file_name": "sub/a.jpg", "text": "first", "tags": "x"}, {"file_name": "b.png", "text": "second"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    paths, captions = read_folder_captions(str(tmp_path))
    assert [p.split("/")[-1] for p in paths] == ["a.jpg", "b.png"] and captions == ["first", "second"]
    with pytest.raises(DataError, match="'tags' not found in .*metadata.jsonl line 2"):
        read_folder_captions(str(tmp_path), caption_column="tags")
    with pytest.raises(DataError, match="no image column 'picture'"):
        (tmp_path / "metadata.jsonl").write_text(json.dumps({"picture_x": "b.png"}) + "\n", encoding="utf-8")
        read_folder_captions(str(tmp_path), image_column="picture")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"picture": "b.png", "caption": "c"}) + "\n",
                                             encoding="utf-8")
    assert read_folder_captions(str(tmp_path), image_column="picture")[1] == ["c"]
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "gone.png"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="gone.png does not exist"):
        read_folder_captions(str(tmp_path))


def test_caption_column_without_metadata_is_an_error(tmp_path):
    save(tmp_path, "a.png", gradient(16, 16))
    with pytest.raises(DataError, match="--caption_column text needs .*metadata.jsonl"):
        read_folder_captions(str(tmp_path), caption_column="text")


def test_exif_orientation_rgba_and_greyscale(tmp_path):
    wide = gradient(30, 10)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = save(tmp_path, "rot.jpg", wide, exif=exif, quality=100)
    assert load_image(str(path)).size == (10, 30)  # displayed upright: tall
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:4, ..., 3] = 255  # top half opaque red, bottom half transparent
    image = np.asarray(load_image(str(save(tmp_path, "a.png", rgba))))
    assert image.shape == (8, 8, 3) and tuple(image[0, 0]) == (200, 0, 0) and tuple(image[7, 7]) == (255, 255, 255)
    grey = np.asarray(load_image(str(save(tmp_path, "g.png", np.full((6, 6), 77, np.uint8)))))
    assert grey.shape == (6, 6, 3) and (grey == 77).all()


def test_corrupt_and_empty_folders_are_named(tmp_path):
    save(tmp_path / "data", "good.png", gradient(16, 16))
    (tmp_path / "data" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(DataError, match=r"cannot read image .*broken\.jpg"):
        DreamBoothDataset(str(tmp_path / "data"), "x", 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty has no images"):
        DreamBoothDataset(str(tmp_path / "empty"), "x", 16)
    with pytest.raises(DataError, match="nope does not exist"):
        DreamBoothDataset(str(tmp_path / "nope"), "x", 16)


def test_resize_and_crop_matches_torchvision_square_rules():
    image = Image.fromarray(gradient(50, 30))
    out = resize_and_crop(image, 16, 16, center_crop=True, rng=np.random.default_rng(0))
    # shorter side 30 -> 16, longer 50 -> int(16 * 50 / 30) = 26, centre crop at left round(5.0) = 5
    expected = np.asarray(image.resize((26, 16), Image.BILINEAR))[:, 5:21]
    np.testing.assert_array_equal(out, expected)
    pixels = to_pixels(out, flip=True)
    assert pixels.shape == (3, 16, 16) and pixels.dtype == np.float32
    np.testing.assert_allclose(pixels, expected[:, ::-1].transpose(2, 0, 1) / 127.5 - 1, atol=1e-6)


def test_buckets_group_images_by_shape(tmp_path):
    assert parse_buckets("32,64; 64,32;32,32") == [(32, 64), (64, 32), (32, 32)]
    with pytest.raises(DataError, match="multiples of 16"):
        parse_buckets("30,64")
    with pytest.raises(DataError, match="not 'height,width'"):
        parse_buckets("32x64")
    buckets = [(32, 64), (64, 32), (32, 32)]
    assert nearest_bucket(100, 210, buckets) == 0 and nearest_bucket(300, 140, buckets) == 1
    assert nearest_bucket(50, 52, buckets) == 2
    for i, (w, h) in enumerate([(80, 40), (90, 44), (40, 80), (40, 40), (81, 40)]):
        save(tmp_path, f"{i}.png", gradient(w, h, i))
    data = DreamBoothDataset(str(tmp_path), "x", 32, center_crop=True, buckets=buckets)
    assert [data.shape_of(i) for i in range(5)] == [(32, 64), (32, 64), (64, 32), (32, 32), (32, 64)]
    rng = np.random.default_rng(0)
    for _ in range(5):
        batches = data.epoch_batches(2, rng)
        assert sorted(i for b in batches for i in b) == list(range(5))
        assert all(len({data.shape_of(i) for i in b}) == 1 for b in batches)
        assert sorted(len(b) for b in batches) == [1, 1, 1, 2]  # (3 wide -> 2 + 1), tall, square
    with pytest.raises(DataError, match="cannot be combined with --with_prior_preservation"):
        DreamBoothDataset(str(tmp_path), "x", 32, buckets=buckets, class_data_dir=str(tmp_path))


def test_epoch_order_is_diffusers_and_even_for_several_processes(tmp_path):
    for i in range(5):
        save(tmp_path, f"{i}.png", gradient(16, 16, i))
    data = DreamBoothDataset(str(tmp_path), "x", 16, center_crop=True)
    order = np.random.default_rng(3).permutation(5)
    assert data.epoch_batches(2, np.random.default_rng(3)) == [list(order[:2]), list(order[2:4]), list(order[4:])]
    batches = data.epoch_batches(2, np.random.default_rng(3), num_replicas=2)  # global batches of 4
    assert batches == [list(order[:4]), [order[4]] + list(order[:3])]  # filled up from the epoch's start


def test_flips_and_caption_drops_are_drawn_per_step(tmp_path):
    save(tmp_path, "a.png", gradient(16, 16))
    data = DreamBoothDataset(str(tmp_path), "x", 16, center_crop=True)
    rng = np.random.default_rng(0)
    draws = [data.draw_step(4, rng, random_flip=True, caption_dropout=0.25) for _ in range(200)]
    flips = np.stack([d.flips for d in draws])
    drops = np.stack([d.drop_captions for d in draws])
    # the same image is flipped in some steps and not in others; the rates are the asked ones
    assert 0.45 < flips.mean() < 0.55 and 0.2 < drops.mean() < 0.3 and flips[:, 0].any() and not flips[:, 0].all()
    off = data.draw_step(4, rng, random_flip=False, caption_dropout=0.0)
    assert not off.flips.any() and not off.drop_captions.any()
    np.testing.assert_array_equal(data.instance(0, flip=True), data.instance(0)[:, :, ::-1])
