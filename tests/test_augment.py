import pytest
import torch

from contrastive_cli.augment import BatchAugment, TwoViews, normalize
from contrastive_cli.errors import UserError

MEAN3, STD3 = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def recipe(**kw):
    base = dict(size=32, mean=MEAN3, std=STD3, crop_scale=(0.2, 1.0), flip_p=0.5, jitter_p=0.8,
                brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, gray_p=0.2, blur_p=0.5, solarize_p=0.2)
    base.update(kw)
    return BatchAugment(**base)


def images(n=64, c=3, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, size, size), dtype=torch.uint8, generator=g)


def test_parameters_differ_across_the_batch():
    p = recipe().sample(256, 32, 32, torch.Generator().manual_seed(0))
    for key in ("w", "h", "cx", "cy", "brightness", "contrast", "saturation", "hue", "sigma"):
        assert p[key].unique().numel() > 200, key  # continuous draws: all but a few distinct
    for key, prob in (("flip", 0.5), ("jitter", 0.8), ("gray", 0.2), ("blur", 0.5), ("solarize", 0.2)):
        assert abs(p[key].float().mean().item() - prob) < 0.1, key
    # the crop area stays within the recipe's scale range
    area = p["w"] * p["h"] / (32 * 32)
    assert area.min() >= 0.2 - 1e-4 and area.max() <= 1.0 + 1e-4


def test_each_sample_is_transformed_on_its_own():
    # the same image repeated 16 times: per-batch parameters would give 16 identical outputs
    x = images(1).repeat(16, 1, 1, 1)
    out = recipe()(x, torch.Generator().manual_seed(1))
    flat = out.flatten(1)
    dists = torch.cdist(flat, flat)
    assert (dists + torch.eye(16) * 1e9).min() > 1e-3


def test_output_shape_dtype_and_range():
    aug = recipe(size=24)
    out = aug(images(8), torch.Generator().manual_seed(0))
    assert out.shape == (8, 3, 24, 24) and out.dtype == torch.float32
    pixels = out * aug.std + aug.mean  # undo the normalization: back in [0, 1]
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_grey_images_and_identity_recipe():
    aug = BatchAugment(size=28, mean=[0.0], std=[1.0], crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0),
                       flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0)
    x = images(4, c=1, size=28)
    out = aug(x, torch.Generator().manual_seed(0))
    # a full-image crop at the same size is the identity (up to interpolation rounding)
    assert torch.allclose(out, x.float() / 255, atol=1e-5)
    assert torch.allclose(normalize(x, [0.0], [1.0]), x.float() / 255)


def test_two_views_differ_and_a_seed_reproduces_them():
    views = TwoViews(recipe(), recipe())
    x = images(8)
    v1, v2 = views(x, torch.Generator().manual_seed(3))
    assert (v1 - v2).flatten(1).abs().mean(1).min() > 1e-3
    w1, w2 = views(x, torch.Generator().manual_seed(3))
    assert torch.equal(v1, w1) and torch.equal(v2, w2)


def test_flip_mirrors_the_image():
    aug = BatchAugment(size=8, mean=[0.0], std=[1.0], crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0),
                       flip_p=1.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0)
    x = torch.arange(64, dtype=torch.uint8).view(1, 1, 8, 8)
    out = aug(x, torch.Generator().manual_seed(0))
    assert torch.allclose(out, x.flip(-1).float() / 255, atol=1e-5)


def test_blur_and_solarize_act_per_sample():
    x = images(2)
    always = recipe(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0, jitter_p=0, gray_p=0,
                    blur_p=0, solarize_p=1.0)
    out = always(x, torch.Generator().manual_seed(0)) * always.std + always.mean
    ref = x.float() / 255
    assert torch.allclose(out, torch.where(ref >= 0.5, 1 - ref, ref), atol=1e-5)
    blur = recipe(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0, jitter_p=0, gray_p=0,
                  blur_p=1.0, blur_sigma=(1.5, 1.5), solarize_p=0)
    out = blur(x, torch.Generator().manual_seed(0)) * blur.std + blur.mean
    assert out.std() < ref.std() * 0.8  # blurring noise lowers its variance


@pytest.mark.parametrize("bad", [dict(flip_p=1.5), dict(crop_scale=(0.5, 0.2)), dict(hue=0.9), dict(size=0)])
def test_bad_recipe_values_are_rejected(bad):
    with pytest.raises(UserError):
        recipe(**bad)


def test_crops_touching_the_edge_repeat_it_instead_of_fading_to_black():
    # the whole 8 x 8 white image upscaled to 32: the outer samples fall within half a pixel of the
    # edge, where zero padding blended in black (0.625 instead of 1.0)
    aug = recipe(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)
    out = aug(torch.full((4, 3, 8, 8), 255, dtype=torch.uint8), torch.Generator().manual_seed(0))
    white = (1.0 - torch.tensor(MEAN3)) / torch.tensor(STD3)
    assert torch.allclose(out, white.view(1, 3, 1, 1).expand_as(out), atol=1e-5)
    # a rotation reaches outside the image: there, black as torchvision's RandomRotation fills
    rotated = recipe(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter_p=0.0, gray_p=0.0, blur_p=0.0,
                     solarize_p=0.0, rotate_deg=45)(torch.full((64, 3, 8, 8), 255, dtype=torch.uint8),
                                                    torch.Generator().manual_seed(0))
    assert rotated.amin() < white.amin() - 1.0
