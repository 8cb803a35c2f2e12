"""The procedural shapes dataset is deterministic and its classifier reads back what was drawn."""

import numpy as np

from mindflux.demo.shapes import SHAPES, classify, render, sample_specs


def test_same_seed_same_images():
    a = [np.asarray(render(s)) for s in sample_specs(4, seed=3)]
    b = [np.asarray(render(s)) for s in sample_specs(4, seed=3)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], np.asarray(render(sample_specs(1, seed=4)[0])))


def test_classifier_reads_back_every_rendered_attribute():
    specs = sample_specs(300, seed=0)
    assert {s.shape for s in specs} == set(SHAPES)
    readings = [classify(render(s)) for s in specs]
    assert all(r.shape == s.shape for r, s in zip(readings, specs))
    assert all(r.colour == s.colour and r.background == s.background for r, s in zip(readings, specs))
    assert all(s.colour != s.background for s in specs)


def test_captions_read_naturally():
    caption = sample_specs(1, seed=0)[0].caption
    assert caption.startswith(("a ", "an ")) and caption.endswith(" background")
    assert all(s.caption.startswith("an ") for s in sample_specs(200, seed=1) if s.colour == "orange")


def test_blank_image_reads_as_no_shape():
    assert classify(np.full((64, 64, 3), 255, np.uint8)).shape == "none"
