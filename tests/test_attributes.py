"""Attributes measured from pixels, on images drawn here whose answer is known by construction."""

import math

import pytest
import torch

from genfast import attributes, images
from genfast.errors import GenfastError

SIZE = 28


def canvas(n: int = 1) -> torch.Tensor:
    return torch.zeros(n, 1, SIZE, SIZE, dtype=torch.uint8)


def rectangle(width: int, height: int, value: int = 255) -> torch.Tensor:
    """A filled rectangle, centred."""
    x = canvas()
    top, left = (SIZE - height) // 2, (SIZE - width) // 2
    x[0, 0, top:top + height, left:left + width] = value
    return x


def stroke(width: float, angle_deg: float, length: float = 18) -> torch.Tensor:
    """A straight stroke through the centre, `width` pixels across, at `angle_deg` from the horizontal
    (counter-clockwise, with y up: 60 degrees is "/", 120 degrees is "\\")."""
    rows, cols = torch.meshgrid(torch.arange(SIZE).float(), torch.arange(SIZE).float(), indexing="ij")
    c = (SIZE - 1) / 2
    x, y = cols - c, c - rows
    a = math.radians(angle_deg)
    along, across = x * math.cos(a) + y * math.sin(a), -x * math.sin(a) + y * math.cos(a)
    inside = (across.abs() <= width / 2) & (along.abs() <= length / 2)
    return (inside.to(torch.uint8) * 255)[None, None]


def ring(thickness: int, radius: int = 9) -> torch.Tensor:
    """A "zero": a circle's outline `thickness` pixels wide."""
    rows, cols = torch.meshgrid(torch.arange(SIZE).float(), torch.arange(SIZE).float(), indexing="ij")
    distance = ((rows - 13.5) ** 2 + (cols - 13.5) ** 2).sqrt()
    inside = (distance <= radius) & (distance > radius - thickness)
    return (inside.to(torch.uint8) * 255)[None, None]


def one(images_: torch.Tensor, name: str) -> list[float]:
    return attributes.measure(images_)[name].tolist()


def test_a_thick_stroke_measures_thicker_than_a_thin_one_in_every_direction():
    for angle in (0, 30, 45, 60, 90, 135):
        widths = one(torch.cat([stroke(w, angle) for w in (2, 3, 4, 5, 6)]), "thickness")
        assert widths == sorted(widths) and widths[-1] > 1.8 * widths[0], (angle, widths)
    thin, thick = one(torch.cat([ring(2), ring(5)]), "thickness")
    assert thin < thick


def test_thickness_is_the_stroke_width_in_pixels():
    for width in (2, 6):
        for image in (rectangle(18, width), rectangle(width, 18), stroke(width, 45)):
            # A thin diagonal is a staircase of 3 pixels per row on a 28x28 grid: up to a pixel more.
            tolerance = 1.4 if width == 2 else 0.25 * width
            assert one(image, "thickness")[0] == pytest.approx(width, abs=tolerance)


def test_a_slanted_line_measures_slanted_with_the_right_sign():
    right, upright, left = one(torch.cat([stroke(3, 60), stroke(3, 90), stroke(3, 120)]), "slant")
    assert right == pytest.approx(1 / math.tan(math.radians(60)), rel=0.1)  # 0.58 pixels right per pixel up
    assert upright == pytest.approx(0, abs=1e-6)
    assert left == pytest.approx(-right, rel=1e-5)


def test_a_bright_square_is_brighter_than_a_dim_one():
    bright, dim = one(torch.cat([rectangle(12, 12, 230), rectangle(12, 12, 120)]), "brightness")
    assert bright == pytest.approx(230 / 255) and dim == pytest.approx(120 / 255)


def test_a_wide_rectangle_is_wider_than_a_tall_one():
    wide, tall = one(torch.cat([rectangle(20, 8), rectangle(8, 20)]), "width")
    assert wide == pytest.approx(20 / 8) and tall == pytest.approx(8 / 20)


def test_a_striped_patch_is_more_textured_than_a_flat_one():
    striped, flat = rectangle(16, 16), rectangle(16, 16)
    striped[0, 0, ::2] = striped[0, 0, ::2] // 2  # every other row at half the intensity
    textured, plain = one(torch.cat([striped, flat]), "texture")
    assert plain == 0  # the outline of the patch does not count
    assert textured > 0.1


def test_a_big_blob_is_larger_than_a_small_one():
    measured = attributes.measure(torch.cat([rectangle(20, 20), rectangle(6, 6)]))
    assert measured["area"].tolist() == pytest.approx([400 / 784, 36 / 784])
    assert measured["height"].tolist() == pytest.approx([20 / 28, 6 / 28])


def test_float_images_in_minus_one_one_measure_as_their_uint8():
    pixels = torch.cat([stroke(4, 70), ring(3), rectangle(10, 20, 150)])
    assert attributes.measure(images.to_float(pixels)).keys() == attributes.measure(pixels).keys()
    for name, values in attributes.measure(images.to_float(pixels)).items():
        assert torch.allclose(values, attributes.measure(pixels)[name], atol=1e-5), name


def test_a_batch_measures_as_its_images_alone_across_chunks(monkeypatch):
    pixels = torch.cat([stroke(4, 70), ring(3), rectangle(10, 20, 150), canvas()])
    alone = [attributes.measure(pixels[i:i + 1]) for i in range(len(pixels))]
    monkeypatch.setattr(attributes, "CHUNK", 3)  # a batch measured in two chunks
    together = attributes.measure(pixels)
    for name in attributes.ATTRIBUTES:
        assert torch.allclose(together[name], torch.cat([a[name] for a in alone])), name


def test_an_empty_image_measures_zero_everywhere():
    assert all(values.tolist() == [0.0] for values in attributes.measure(canvas()).values())


def test_a_wrong_shape_is_one_clear_error():
    with pytest.raises(GenfastError, match=r"expected images of shape \(N, C, H, W\), got \(28, 28\)"):
        attributes.measure(torch.zeros(28, 28))


def test_thresholds_split_each_class_into_thirds():
    # Class 0: the values 0..299; class 1: 1000..1299, so its words are its own, not class 0's.
    values = torch.cat([torch.arange(300.0), 1000 + torch.arange(300.0)])
    labels = torch.cat([torch.zeros(300), torch.ones(300)]).long()
    found = attributes.thresholds({"brightness": values}, labels, num_classes=3)
    levels = found.levels({"brightness": values}, labels)["brightness"]
    for index in (0, 1):
        mine = levels[labels == index]
        assert [int((mine == k).sum()) for k in (-1, 0, 1)] == [100, 100, 100]
        assert (mine[:100] == -1).all() and (mine[-100:] == 1).all()  # the lowest third is "low"
    assert found.low["brightness"][1] > found.high["brightness"][0]
    # A class with no images has no thresholds to be beyond: never a word.
    extremes = torch.tensor([-1e9, 1e9])
    assert found.levels({"brightness": extremes}, torch.tensor([2, 2]))["brightness"].tolist() == [0, 0]
    assert found.as_dict()["brightness"]["low"][0] == pytest.approx(299 / 3)
