"""ATS transformations: each op against torchvision (or PIL, ATS's own code path), the batched
policy application against a per-image loop, the sub-policy table and the policy lists."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageEnhance, ImageOps

from spfl_vmap.defenses import ats
from spfl_vmap.errors import ConfigError

SHAPE = (2, 3)  # (n clients, B) images per call; odd sizes below so that no axis is a power of two


def images(c: int, seed: int = 0, h: int = 13, w: int = 11) -> torch.Tensor:
    """``(2, 3, c, h, w)`` random 8-bit levels as floats in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (*SHAPE, c, h, w), generator=g).float() / 255


def per_image(x: torch.Tensor, v: torch.Tensor, fn) -> torch.Tensor:
    """The reference: ``fn(image (C, H, W), float parameter)`` one image at a time."""
    out = torch.empty_like(x)
    for i in range(SHAPE[0]):
        for j in range(SHAPE[1]):
            out[i, j] = fn(x[i, j], float(v[i, j]))
    return out


def params(seed: int, lo: float, hi: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + seed)
    return lo + (hi - lo) * torch.rand(SHAPE, generator=g, dtype=torch.float64)


def u8(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x * 255).to(torch.uint8)


# ---- each op against torchvision.transforms.v2.functional, with a parameter per image ----------
# Float ops: torchvision computes the same formula on float images; 1e-6 allows for a different
# order of float32 operations (one ulp of values in [0, 1] is 6e-8).
FLOAT_OPS = [
    ("invert", 0.0, 0.0, lambda im, v: TF.invert(im)),
    ("brightness", 0.5, 1.5, lambda im, v: TF.adjust_brightness(im, v)),
    ("contrast", 0.5, 1.5, lambda im, v: TF.adjust_contrast(im, v)),
    ("color", 0.5, 1.5, lambda im, v: TF.adjust_saturation(im, v)),
    ("sharpness", 0.5, 1.5, lambda im, v: TF.adjust_sharpness(im, v)),
    ("autocontrast", 0.0, 0.0, lambda im, v: TF.autocontrast(im)),
    ("solarize", 0.0, 256.0, lambda im, v: TF.solarize(im, v / 255)),  # ATS's threshold is on the 0..256 scale
    # PIL's rotate turns counter-clockwise about the centre, as torchvision's; ATS fills with grey 128
    ("rotate", -30.0, 30.0, lambda im, v: TF.rotate(im, v, fill=[128 / 255] * im.shape[0])),
    # PIL's (1, 0, t, 0, 1, 0) samples the input at u + t: torchvision's forward translation by -t
    ("translateX", -150 / 331, 150 / 331,
     lambda im, v: TF.affine(im, 0.0, [-v * im.shape[-1], 0.0], 1.0, [0.0, 0.0], fill=[0.0] * im.shape[0])),
    ("translateY", -150 / 331, 150 / 331,
     lambda im, v: TF.affine(im, 0.0, [0.0, -v * im.shape[-2]], 1.0, [0.0, 0.0], fill=[0.0] * im.shape[0])),
]


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("op,lo,hi,ref", FLOAT_OPS, ids=[o[0] for o in FLOAT_OPS])
def test_float_ops_equal_torchvision(op, lo, hi, ref, c):
    x = images(c, seed=c)
    if op == "autocontrast":
        x = 0.2 + 0.6 * x  # something to stretch
    v = params(len(op), lo, hi)
    ours = ats.OPS[op](x, v)  # all 6 images in one call, each with its own parameter
    expected = per_image(x, v, ref)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)


# Integer ops: torchvision's uint8 kernels are PIL's integer maths (posterize's bit mask,
# equalize's lookup table); on 8-bit levels they must agree exactly.
@pytest.mark.parametrize("c", [1, 3])
def test_posterize_equals_torchvision_uint8(c):
    x = images(c, seed=7)
    bits = torch.tensor([[4, 5, 6], [7, 8, 4]])
    ours = ats.posterize(x, bits)
    expected = per_image(x, bits, lambda im, b: TF.posterize(u8(im), int(b)).float() / 255)
    torch.testing.assert_close(ours, expected, atol=0, rtol=0)


@pytest.mark.parametrize("c", [1, 3])
def test_equalize_equals_torchvision_uint8(c):
    x = images(c, seed=8)
    x[0, 0] = 0.3  # a constant image: no equalization (step 0)
    x[0, 1] = (x[0, 1] * 16).floor() / 16 * 0.5  # few levels, low range
    ours = ats.equalize(x)
    expected = per_image(x, torch.zeros(SHAPE), lambda im, _: TF.equalize(u8(im)).float() / 255)
    torch.testing.assert_close(ours, expected, atol=0, rtol=0)


# ---- ATS's own code path: PIL -----------------------------------------------------------------
def pil(x: torch.Tensor) -> Image.Image:
    a = u8(x).permute(1, 2, 0).numpy()
    return Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)


def from_pil(img: Image.Image) -> torch.Tensor:
    a = np.asarray(img).astype(np.float32) / 255
    return torch.from_numpy(a[None] if a.ndim == 2 else a.transpose(2, 0, 1).copy())


def fill_of(img: Image.Image, value: int):
    return value if img.mode == "L" else (value,) * 3


def pil_rotate(img: Image.Image, deg: float) -> Image.Image:
    """ATS's ``rotate_with_fill``."""
    rot = img.convert("RGBA").rotate(deg)
    return Image.composite(rot, Image.new("RGBA", rot.size, (128,) * 4), rot).convert(img.mode)


# (op, ATS's PIL call, parameters, tolerance in 8-bit levels)
PIL_CASES = [
    # torchvision's tensor affine has no bicubic: PIL itself is the reference. PIL computes the
    # a = -1 cubic in double and truncates to 8 bits, so ours (not truncated) is within one level.
    ("shearX", lambda im, k: im.transform(im.size, Image.AFFINE, (1, k, 0, 0, 1, 0), Image.BICUBIC, fillcolor=fill_of(im, 0)),
     [0.3, -0.1667, 0.0667], 1.0),
    ("shearY", lambda im, k: im.transform(im.size, Image.AFFINE, (1, 0, 0, k, 1, 0), Image.BICUBIC, fillcolor=fill_of(im, 0)),
     [-0.3, 0.1667, 0.0333], 1.0),
    # nearest sampling at pixel centres: exact (ATS's magnitudes never land on a pixel boundary)
    ("translateX", lambda im, f: im.transform(im.size, Image.AFFINE, (1, 0, f * im.size[0], 0, 1, 0), fillcolor=fill_of(im, 0)),
     [150 / 331, -150 / 331 * 5 / 9, 150 / 331 * 2 / 9], 0.0),
    ("translateY", lambda im, f: im.transform(im.size, Image.AFFINE, (1, 0, 0, 0, 1, f * im.size[1]), fillcolor=fill_of(im, 0)),
     [-150 / 331 * 3 / 9, 150 / 331 * 3 / 9, 150 / 331], 0.0),
    ("rotate", pil_rotate, [30 * 2 / 9, 17.0], 0.0),
    ("posterize", lambda im, b: ImageOps.posterize(im, int(b)), [4, 6, 7], 0.0),
    ("equalize", lambda im, _: ImageOps.equalize(im), [0], 0.0),
    # float 1 - x against (255 - k) / 255: float32 rounding only
    ("solarize", lambda im, t: ImageOps.solarize(im, t), [256.0, 256 * 8 / 9, 256 * 5 / 9], 1e-4),
    ("invert", lambda im, _: ImageOps.invert(im), [0], 1e-4),
    # PIL truncates the stretched value to an integer level (int(i * scale + offset))
    ("autocontrast", lambda im, _: ImageOps.autocontrast(im), [0], 1.0),
    # PIL rounds its degenerate image to 8 bits (integer luma 0.299/0.587/0.114 against torchvision's
    # 0.2989, the contrast mean to a level, the smoothed image): up to 0.5 level times |1 - f| = 0.5,
    # plus the blended result's rounding, one level: 1.25 levels, and 0.05 for the luma weights.
    ("color", lambda im, f: ImageEnhance.Color(im).enhance(f), [0.5, 1.5], 1.3),
    ("contrast", lambda im, f: ImageEnhance.Contrast(im).enhance(f), [0.5, 1.5], 1.3),
    ("sharpness", lambda im, f: ImageEnhance.Sharpness(im).enhance(f), [0.5, 1.5], 1.3),
    ("brightness", lambda im, f: ImageEnhance.Brightness(im).enhance(f), [0.5, 1.5], 1.3),
]


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("op,call,values,tol", PIL_CASES, ids=[o[0] for o in PIL_CASES])
def test_ops_follow_ats_pil_code(op, call, values, tol, c):
    x = images(c, seed=11, h=32, w=28)[0, 0]  # (c, 32, 28)
    if op == "autocontrast":
        x = (40 + torch.round(x * 150)) / 255
    for v in values:
        ours = ats.OPS[op](x, torch.tensor(float(v)))
        expected = from_pil(call(pil(x), v))
        assert float((ours - expected).abs().max()) * 255 <= tol + 1e-4, (op, v)


# ---- the table, the lists and policy parsing --------------------------------------------------
def test_sub_policy_table_matches_ats_ranges():
    # ATS autoaugment.py's ranges, computed here with numpy as ATS does
    ranges = {
        "shearX": np.linspace(0, 0.3, 10), "shearY": np.linspace(0, 0.3, 10),
        "translateX": np.linspace(0, 150 / 331, 10), "translateY": np.linspace(0, 150 / 331, 10),
        "rotate": np.linspace(0, 30, 10), "color": np.linspace(0.0, 0.5, 10),
        "posterize": np.round(np.linspace(8, 4, 10), 0).astype(int), "solarize": np.linspace(256, 0, 10),
        "contrast": np.linspace(0.0, 0.5, 10), "sharpness": np.linspace(0.0, 0.5, 10),
        "brightness": np.linspace(0.0, 0.5, 10), "autocontrast": [0] * 10, "equalize": [0] * 10, "invert": [0] * 10,
    }
    assert len(ats.SUB_POLICIES) == 50
    for sub in ats.SUB_POLICIES:
        assert sub.magnitude == pytest.approx(float(ranges[sub.op][sub.level]), abs=1e-12)
    counts = {}
    for sub in ats.SUB_POLICIES:
        counts[sub.op] = counts.get(sub.op, 0) + 1
    # references/modules.md (read from ATSPrivacy policy.py): 13 ops with these counts
    assert counts == {"equalize": 9, "autocontrast": 7, "sharpness": 5, "translateY": 5, "color": 5, "brightness": 4,
                      "solarize": 4, "invert": 3, "contrast": 2, "translateX": 2, "shearY": 2, "rotate": 1, "posterize": 1}


def test_every_listed_policy_is_valid():
    for key, names in ats.POLICY_LISTS.items():
        for name in names:
            ids = ats.parse_policy(name)
            assert len(ids) == 3 and all(0 <= i < 50 for i in ids), (key, name)
            assert ats.policy_name(ids) == name
    # references/modules.md: 3-1-7 is translateX 45.3%, contrast 1 +- 0.333, translateY 10.1%
    assert ats.describe_policy(ats.parse_policy("3-1-7")) == "translateX 0.453, contrast 0.333, translateY 0.101"
    assert ats.parse_policies("3-1-7+43-18-18") == ((3, 1, 7), (43, 18, 18))


@pytest.mark.parametrize("text", ["3-50", "3-1-x", "", "3--1", "-3", "3-1-7+99"])
def test_unknown_policy_is_one_line_config_error(text):
    with pytest.raises(ConfigError) as e:
        ats.parse_policies(text)
    assert "\n" not in str(e.value) and "ATS policy" in str(e.value)


# ---- policies, batched against a per-image loop --------------------------------------------------
def reference_policy(x: torch.Tensor, policies, u: torch.Tensor, use_prob: bool) -> torch.Tensor:
    """One image at a time: pick the policy, then each op with its own sign and gate (ATS's
    ``sub_transform.__call__`` over ``SubPolicy.__call__``)."""
    L = max(len(p) for p in policies)
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            im, draws = x[i, j], u[i, j]
            policy = policies[min(int(float(draws[0]) * len(policies)), len(policies) - 1)]
            for slot, sub_id in enumerate(policy):
                sub = ats.SUB_POLICIES[sub_id]
                if use_prob and not float(draws[1 + L + slot]) < sub.prob:
                    continue
                sign = 1.0 if float(draws[1 + slot]) < 0.5 else -1.0
                im = ats.OPS[sub.op](im, sub.value(torch.tensor(sign)))
            out[i, j] = im
    return out


@pytest.mark.parametrize("use_prob", [False, True])
@pytest.mark.parametrize("text", ["3-1-7", "3-1-7+43-18-18", "41-11-31+6-10+2+0-21-19-5+14-27-9"])
@pytest.mark.parametrize("c", [1, 3])
def test_apply_policy_equals_per_image_loop(text, use_prob, c):
    policies = ats.parse_policies(text)
    x = torch.rand(3, 5, c, 12, 10, generator=torch.Generator().manual_seed(3))
    u = ats.draw_uniforms((3, 5), policies, torch.Generator().manual_seed(4))
    ours = ats.apply_policy(x, policies, u, use_prob)
    torch.testing.assert_close(ours, reference_policy(x, policies, u, use_prob), atol=1e-6, rtol=0)
    assert not torch.equal(ours, x)


def test_ops_apply_whatever_the_probability_unless_asked():
    # 29 is "invert" with probability 0.0: ATS applies it anyway; with use_prob it never applies
    x = torch.rand(4, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    u = ats.draw_uniforms((4,), ((29,),), torch.Generator().manual_seed(1))
    assert torch.allclose(ats.apply_policy(x, ((29,),), u), 1 - x)
    assert torch.equal(ats.apply_policy(x, ((29,),), u, use_prob=True), x)


def test_hybrid_draws_each_policy_uniformly():
    # two policies that are easy to tell apart: invert (0) and identity (solarize at 256, 28)
    policies = ((0,), (28,))
    x = torch.full((4000, 1, 2, 2), 0.25)
    u = ats.draw_uniforms((4000,), policies, torch.Generator().manual_seed(2))
    inverted = (ats.apply_policy(x, policies, u)[:, 0, 0, 0] > 0.5).double().mean()
    assert abs(float(inverted) - 0.5) < 4 * (0.25 / 4000) ** 0.5  # 4 sigma of a fair coin's mean
