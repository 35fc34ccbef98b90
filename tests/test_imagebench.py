"""Tests of the rendered image benchmark (dedn.data.imagebench)."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from dedn.data.imagebench import PALETTE, PART_NAMES, ImageBenchConfig, make_image_benchmark, save_images, to_zsldata
from dedn.errors import ConfigError, DataError
from dedn.eval.localisation import area_downsample, attention_in_mask_share

SMALL = ImageBenchConfig(seed=3, n_classes=8, n_unseen=2, n_val=2, images_per_class=6, image_size=96)
# No jitter of colours, lighting or pixels, and no occluders: rendered colours are exactly the palette's.
CLEAN = replace(SMALL, color_jitter=0.0, lighting_jitter=0.0, noise=0.0, occlusion_prob=0.0, clutter=0.0)


@pytest.fixture(scope="module")
def bench():
    return make_image_benchmark(ImageBenchConfig(seed=0))


# ---------------------------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_benchmark_pixels_and_masks():
    a, b = make_image_benchmark(SMALL), make_image_benchmark(SMALL)
    np.testing.assert_array_equal(a.class_att, b.class_att)
    np.testing.assert_array_equal(a.image_att, b.image_att)
    np.testing.assert_array_equal(a.trainval_loc, b.trainval_loc)
    assert a.class_names == b.class_names
    for i in (0, 7, len(a) - 1):
        pa, ma = a.render(i)
        pb, mb = b.render(i)
        np.testing.assert_array_equal(pa, pb)
        np.testing.assert_array_equal(ma, mb)


def test_image_is_the_same_rendered_alone_or_in_sequence():
    bench = make_image_benchmark(SMALL)
    in_sequence = [bench.render(i) for i in range(6)]
    alone_pixels, alone_masks = make_image_benchmark(SMALL).render(4)
    np.testing.assert_array_equal(in_sequence[4][0], alone_pixels)
    np.testing.assert_array_equal(in_sequence[4][1], alone_masks)
    np.testing.assert_array_equal(bench.render(4)[0], alone_pixels)  # re-rendering changes nothing


def test_other_seed_gives_other_benchmark():
    a = make_image_benchmark(SMALL)
    b = make_image_benchmark(replace(SMALL, seed=4))
    assert not np.array_equal(a.class_att, b.class_att)
    assert not np.array_equal(a.render(0)[0], b.render(0)[0])


# ------------------------------------------------------------------------------------------ pixels and masks


def test_render_shapes_and_lazy_images():
    bench = make_image_benchmark(SMALL)
    pixels, masks = bench.render(0)
    assert pixels.shape == (96, 96, 3) and pixels.dtype == np.uint8
    assert masks.shape == (len(PART_NAMES), 96, 96) and masks.dtype == bool
    assert bench.part_names == list(PART_NAMES)
    images = bench.images
    assert len(images) == len(bench)
    img = images[1]
    assert isinstance(img, Image.Image) and img.size == (96, 96) and img.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(img), bench.render(1)[0])
    assert len(images[2:5]) == 3
    with pytest.raises(IndexError):
        bench.render(len(bench))


def test_masks_are_disjoint_and_parts_visible(bench):
    empty = 0
    for i in range(0, len(bench), 97):
        _, masks = bench.render(i)
        assert masks.sum(axis=0).max() <= 1  # visible masks never overlap
        empty += int((masks.sum(axis=(1, 2)) == 0).sum())
        assert masks[PART_NAMES.index("body")].sum() > 0.01 * masks[0].size
    assert empty <= 1  # only an occluder can hide a whole part, which is rare


def test_part_colours_appear_inside_their_masks():
    bench = make_image_benchmark(replace(CLEAN, images_per_class=3))
    for i in range(len(bench)):
        pixels, masks = bench.render(i)
        values = bench.image_attributes(i)
        for part, group in (("head", "head_color"), ("tail", "tail_color"), ("legs", "leg_color"),
                            ("body", "body_color")):
            if part == "body" and values["body_pattern"] != "solid":
                continue
            mask = masks[PART_NAMES.index(part)]
            assert mask.any(), (i, part)
            colours, counts = np.unique(pixels[mask], axis=0, return_counts=True)
            expected = np.array(PALETTE[values[group]])
            # the part's own colour is the most common pixel colour inside its mask (head: besides the eye)
            assert np.abs(colours[counts.argmax()].astype(int) - expected).max() <= 1, (i, part)


def test_patterns_add_a_second_colour():
    bench = make_image_benchmark(replace(CLEAN, n_classes=12, n_unseen=3, images_per_class=4))
    body = PART_NAMES.index("body")
    n_colours = {"solid": [], "striped": []}
    for i in range(len(bench)):
        pattern = bench.image_attributes(i)["body_pattern"]
        if pattern in n_colours:
            pixels, masks = bench.render(i)
            n_colours[pattern].append(len(np.unique(pixels[masks[body]], axis=0)))
    assert n_colours["solid"] and n_colours["striped"]
    assert max(n_colours["solid"]) == 1 and min(n_colours["striped"]) >= 2


def test_image_size_is_configurable():
    bench = make_image_benchmark(replace(SMALL, image_size=160))
    pixels, masks = bench.render(2)
    assert pixels.shape == (160, 160, 3) and masks.shape[1:] == (160, 160)


def test_rendering_speed(bench):
    bench.render(0)  # warm caches
    start = time.perf_counter()
    for i in range(50):
        bench.render(i * 37 % len(bench))
    elapsed = time.perf_counter() - start
    print(f"\nimagebench: rendered 50 images of {bench.image_size} px in {elapsed:.2f} s "
          f"({50 / elapsed:.0f} images/s)")


# ---------------------------------------------------------------------------------------------- attributes


def test_attribute_structure(bench):
    d = bench.n_attributes
    assert len(bench.attribute_names) == d and bench.class_att.shape == (40, d)
    assert all("::" in name for name in bench.attribute_names)
    groups = np.concatenate(list(bench.attribute_groups.values()))
    np.testing.assert_array_equal(np.sort(groups), np.arange(d))
    clusters = np.concatenate(list(bench.clusters.values()))
    np.testing.assert_array_equal(np.sort(clusters), np.arange(d))
    assert list(bench.clusters) == [*PART_NAMES, "global"]
    np.testing.assert_array_equal(bench.clusters["global"], np.flatnonzero(bench.attribute_part == -1))
    striped = bench.attribute_names.index("wing_pattern::striped")
    assert bench.attribute_part[striped] == PART_NAMES.index("wings")
    assert bench.attribute_part[bench.attribute_names.index("habitat::water")] == -1
    for idx in bench.attribute_groups.values():
        np.testing.assert_allclose(bench.class_att[:, idx].sum(axis=1), 1.0, atol=1e-6)
        np.testing.assert_array_equal(bench.image_att[:, idx].sum(axis=1), 1.0)  # one value per group
    assert 0.0 <= bench.class_att.min() and bench.class_att.max() <= 1.0
    assert ((bench.class_att > 0) & (bench.class_att < 1)).any()  # some groups have two values


def test_class_att_is_the_mean_of_image_attributes():
    cfg = ImageBenchConfig(seed=1, n_classes=10, n_unseen=3, n_val=2, images_per_class=600, p_secondary=0.5)
    bench = make_image_benchmark(cfg)
    means = np.stack([bench.image_att[bench.labels == c].mean(axis=0) for c in range(10)])
    np.testing.assert_allclose(means, bench.class_att, atol=0.07)


def test_classes_are_distinct_and_unseen_values_were_seen(bench):
    groups = bench.attribute_groups.values()
    dominant = np.stack([bench.class_att[:, idx].argmax(axis=1) for idx in groups], axis=1)
    dist = (dominant[:, None] != dominant[None]).sum(axis=2)
    np.fill_diagonal(dist, 99)
    assert dist.min() >= bench.config.min_class_distance
    seen_dominant = np.zeros(bench.n_attributes, dtype=bool)
    for c in bench.seen_classes:
        seen_dominant |= bench.class_att[c] >= 0.5
    assert seen_dominant.all()  # every value is the main value of some seen class


def test_semantic_vectors(bench):
    v = bench.semantic_vectors(32)
    assert v.shape == (bench.n_attributes, 32) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(v, make_image_benchmark(ImageBenchConfig(seed=0)).semantic_vectors(32))
    cos = v @ v.T
    np.fill_diagonal(cos, 0)
    assert cos.max() < 0.98  # every attribute has its own vector


# ------------------------------------------------------------------------------------------ splits and export


def test_splits_are_xlsa17_like(bench):
    tv, ts, tu = bench.trainval_loc, bench.test_seen_loc, bench.test_unseen_loc
    everything = np.concatenate([tv, ts, tu])
    np.testing.assert_array_equal(np.sort(everything), np.arange(len(bench)))  # disjoint, covering
    seen, unseen = bench.seen_classes, bench.unseen_classes
    assert seen.size == 30 and unseen.size == 10
    assert not np.isin(bench.labels[tv], unseen).any()
    assert set(bench.labels[ts]) == set(seen.tolist())
    assert set(bench.val_classes.tolist()) <= set(seen.tolist()) and bench.val_classes.size == 8
    assert abs(ts.size / (ts.size + tv.size) - bench.config.test_seen_fraction) < 0.02


def test_to_zsldata(bench):
    features = np.zeros((len(bench), 4, 2, 2), dtype=np.float32)
    data = to_zsldata(bench, features)
    np.testing.assert_allclose(np.linalg.norm(data.att, axis=1), 1.0, atol=1e-5)
    assert data.clusters is not None and list(data.clusters) == list(bench.clusters)
    np.testing.assert_array_equal(data.val_classes, bench.val_classes)
    assert data.w2v.shape == (bench.n_attributes, 64)
    val = data.validation_split()
    assert set(val.class_ids[val.unseen_classes].tolist()) == set(bench.val_classes.tolist())
    with pytest.raises(DataError):
        to_zsldata(bench, features[:-1])


def test_save_images(tmp_path):
    bench = make_image_benchmark(replace(SMALL, n_classes=4, n_unseen=1, n_val=1, images_per_class=3,
                                         image_size=64))
    paths = save_images(bench, tmp_path)
    assert len(paths) == len(bench) and all(p.is_file() for p in paths)
    assert paths[5].parent.name == bench.class_names[bench.labels[5]]
    pixels, masks = bench.render(5)
    np.testing.assert_array_equal(np.asarray(Image.open(paths[5])), pixels)
    saved = np.load(tmp_path / "masks.npz")
    part_map = saved["part_map"]
    np.testing.assert_array_equal(part_map[5][None] == np.arange(len(PART_NAMES))[:, None, None], masks)
    assert list(saved["part_names"]) == list(PART_NAMES)
    lines = (tmp_path / "images.txt").read_text().splitlines()
    assert lines[5] == f"{paths[5].relative_to(tmp_path).as_posix()} {bench.labels[5]}"
    assert (tmp_path / "benchmark.json").is_file()


def test_bad_config_is_refused():
    for bad in (dict(n_unseen=0), dict(n_val=40), dict(test_seen_fraction=1.0), dict(n_colors=99),
                dict(noise=-1.0), dict(secondary_weight=(0.5, 0.2)), dict(images_per_class=1)):
        with pytest.raises(ConfigError):
            make_image_benchmark(replace(ImageBenchConfig(), **bad))


# ---------------------------------------------------------------------------------------------- localisation


def _uniform(n: int, d: int, h: int, w: int) -> np.ndarray:
    return np.full((n, d, h, w), 1.0 / (h * w), dtype=np.float32)


def test_attention_inside_the_mask_scores_one():
    masks = np.zeros((2, 2, 8, 8), dtype=bool)
    masks[:, 0, :4, :4] = True  # part 0: top-left quarter
    masks[:, 1, 4:, :] = True  # part 1: bottom half
    att = np.zeros((2, 3, 4, 4), dtype=np.float32)
    att[:, 0, :2, :2] = 0.25  # attribute 0 (part 0) looks at the top-left quarter
    att[:, 1, 0, 3] = 1.0  # attribute 1 (part 1) looks at the top right: outside its part
    att[:, 2] = 1.0 / 16  # attribute 2: global
    out = attention_in_mask_share(att, masks, np.array([0, 1, -1]), part_names=["head", "body"])
    np.testing.assert_allclose(out["per_attribute"][:2], [1.0, 0.0], atol=1e-6)
    assert np.isnan(out["per_attribute"][2])
    np.testing.assert_allclose(out["chance_per_attribute"][:2], [0.25, 0.5], atol=1e-6)
    assert out["per_part"] == pytest.approx({"head": 1.0, "body": 0.0})
    assert out["overall"] == pytest.approx(0.5) and out["chance"] == pytest.approx(0.375)
    np.testing.assert_array_equal(out["count_per_attribute"], [2, 2, 0])
    # each part's share beside its own chance (its mean mask area), not only the overall chance
    assert out["chance_per_part"] == pytest.approx({"head": 0.25, "body": 0.5})
    assert out["parts"]["head"] == pytest.approx({"share": 1.0, "chance": 0.25, "share_over_chance": 4.0,
                                                  "n_attributes": 1, "n_images_visible": 2})
    assert out["parts"]["body"]["share"] == 0.0 and out["parts"]["body"]["chance"] == pytest.approx(0.5)


def test_uniform_attention_scores_chance_and_invisible_parts_are_skipped():
    rng = np.random.default_rng(0)
    masks = rng.random((3, 2, 10, 10)) < 0.3
    masks[2, 1] = False  # part 1 not visible in image 2
    out = attention_in_mask_share(_uniform(3, 2, 3, 3), masks, np.array([0, 1]))
    np.testing.assert_allclose(out["per_attribute"], out["chance_per_attribute"], atol=1e-6)
    np.testing.assert_allclose(out["chance_per_attribute"][1], masks[:2, 1].mean(), atol=1e-6)
    np.testing.assert_array_equal(out["count_per_attribute"], [3, 2])


def test_area_downsample_keeps_areas():
    rng = np.random.default_rng(1)
    masks = rng.random((2, 3, 10, 14)) < 0.5
    frac = area_downsample(masks, 3, 4)  # sizes that do not divide evenly
    assert frac.shape == (2, 3, 3, 4) and frac.min() >= 0 and frac.max() <= 1 + 1e-6
    np.testing.assert_allclose(frac.mean(axis=(2, 3)), masks.mean(axis=(2, 3)), atol=1e-6)
    even = area_downsample(masks[..., :8, :12], 2, 3)
    blocks = masks[..., :8, :12].reshape(2, 3, 2, 4, 3, 4).mean(axis=(3, 5))
    np.testing.assert_allclose(even, blocks, atol=1e-6)


def test_area_downsample_inside_a_crop_box():
    rng = np.random.default_rng(2)
    masks = rng.random((2, 3, 12, 16)) < 0.5
    # A whole-pixel box is the plain downsampling of the cropped masks.
    np.testing.assert_allclose(area_downsample(masks, 4, 4, box=(2, 4, 8, 8)),
                               area_downsample(masks[..., 2:10, 4:12], 4, 4), atol=1e-6)
    # A fractional box (a 16 x 16 grid over the central 90% of the image): areas are those inside the box.
    frac = area_downsample(np.ones((1, 1, 12, 16)), 16, 16, box=(0.6, 2.6, 10.8, 10.8))
    np.testing.assert_allclose(frac, 1.0, atol=1e-6)
    half = np.zeros((1, 1, 12, 16))
    half[..., :, 8:] = 1
    np.testing.assert_allclose(area_downsample(half, 2, 2, box=(0, 4, 12, 8)).mean(), 0.5, atol=1e-6)
    with pytest.raises(DataError, match=r"crop box \(0, 4, 12, 13\) does not lie inside the 12 x 16 masks"):
        area_downsample(half, 2, 2, box=(0, 4, 12, 13))


def test_attention_shape_mismatch_is_refused():
    with pytest.raises(DataError):
        attention_in_mask_share(_uniform(2, 3, 2, 2), np.zeros((3, 2, 4, 4), bool), np.array([0, 1, -1]))
    with pytest.raises(DataError):
        attention_in_mask_share(_uniform(2, 3, 2, 2), np.zeros((2, 2, 4, 4), bool), np.array([0, 2, -1]))
