"""ATS image-transformation policies as batched tensor ops (the pure layer).

Gao, Guo, Liu, Tang, Wu & Zhang, "Privacy-preserving Collaborative Learning with Automatic
Transformation Search", CVPR 2021 (code: gaow0007/ATSPrivacy, ``policy.py`` and
``autoaugment.py``; the authors' toolkit csl-cqu/Roubst-and-Privacy-preserving-Federated-Learning-System
copies them as ``modules/data_inference_defense/utils/transformation.py``). A client trains on
transformed images, so the gradients it uploads are those of transformed images, and gradient
inversion recovers the transformed image rather than the original.

ATS's 50 *sub-policies* are single operations with a fixed magnitude (:data:`SUB_POLICIES`); a
*policy* such as ``3-1-7`` composes the listed sub-policies in order. Semantics as in ATS's PIL
code (``SubPolicy``):

* every op of a policy is applied: ``SubPolicy.__call__`` never reads its probability ``p1``.
  :func:`apply_policy` can apply each op with its listed probability instead (``use_prob``);
* ops with a magnitude range draw a sign per call, ``random.choice([-1, 1])``: shear, translate,
  colour, contrast, sharpness and brightness (``1 + sign * m``). Rotate, posterize and solarize
  have no sign;
* fill: black for shear and translate (``fillcolor=(0, 0, 0)``), mid grey ``128`` for rotate
  (``rotate_with_fill`` composites onto ``(128,) * 4``).

Every op here takes images ``x (..., C, H, W)`` in pixel space ``[0, 1]`` and a per-image
parameter ``v (...)`` (a tensor, so each image of ``[n clients, B]`` has its own sign or
magnitude), and works for any channel count, 1-channel images included (ATS itself converts
FashionMNIST to 3 identical channels and back; colour is then the identity, as here). They follow
``torchvision.transforms.v2.functional`` on float images, which computes with the same formulas
as PIL without PIL's rounding to 8 bits after each op; the integer-defined ops (posterize,
equalize) act on the 8-bit levels ``round(255 x)`` as PIL does. Geometric ops sample at pixel
centres as PIL's ``Image.transform`` does; translate and rotate use PIL's default nearest
resampling through ``grid_sample``, shear uses PIL's bicubic (``Image.BICUBIC``; PIL's affine
bicubic is the ``a = -1`` cubic convolution with clamped taps, which ``grid_sample``'s
``a = -0.75`` kernel is not, so shear is written out with gathers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError

Policy = tuple[int, ...]  # indices into SUB_POLICIES, applied in order


# ---- helpers -------------------------------------------------------------------------------------
def _flat(x: torch.Tensor, v: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor, torch.Size]:
    """``x (..., C, H, W)``, ``v`` broadcastable to ``(...)`` -> ``(x (M, C, H, W), v (M,), lead)``."""
    lead = x.shape[:-3]
    v = torch.as_tensor(v, device=x.device).expand(lead).reshape(-1)
    return x.reshape(-1, *x.shape[-3:]), v, lead


def _blend(x: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """``ratio * x + (1 - ratio) * other`` clamped to ``[0, 1]`` (PIL's ``Image.blend(other, x, ratio)``).

    ``x (M, C, H, W)``, ``other`` broadcastable to it, ``ratio (M,)``.
    """
    r = ratio.to(x.dtype)[:, None, None, None]
    return (x * r + other * (1.0 - r)).clamp(0.0, 1.0)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """``(M, C, H, W) -> (M, 1, H, W)``: ITU-R 601 luma for 3 channels (torchvision's weights), the image for 1."""
    if x.shape[-3] == 1:
        return x
    r, g, b = x.unbind(dim=-3)
    return (r * 0.2989 + g * 0.587 + b * 0.114).unsqueeze(-3)


def _levels(x: torch.Tensor) -> torch.Tensor:
    """The 8-bit levels of ``x`` in ``[0, 1]``: ``round(255 x)`` as int64."""
    return torch.round(x.clamp(0.0, 1.0) * 255.0).to(torch.long)


def _affine_nearest(x: torch.Tensor, inverse: torch.Tensor, fill: float) -> torch.Tensor:
    """Nearest-neighbour affine warp with a constant fill, as PIL's ``Image.transform(AFFINE)``.

    Args:
        x: ``(M, C, H, W)`` images.
        inverse: ``(M, 2, 3)`` the map from an output pixel centre ``(u, v) = (col + 0.5, row + 0.5)``
            to the input point it samples (PIL's ``data`` tuple, row-major).
        fill: Value of output pixels whose input point is outside the image.

    Returns:
        ``(M, C, H, W)``. An out-of-range input point gives ``fill``; the mask channel trick is
        torchvision's ``_apply_grid_transform``.
    """
    M, C, H, W = x.shape
    dt = x.dtype
    u = torch.arange(W, device=x.device, dtype=dt) + 0.5
    v = torch.arange(H, device=x.device, dtype=dt) + 0.5
    base = torch.stack([u[None, :].expand(H, W), v[:, None].expand(H, W), torch.ones(H, W, device=x.device, dtype=dt)], -1)  # (H, W, 3)
    src = torch.einsum("hwk,mjk->mhwj", base, inverse.to(dt))  # (M, H, W, 2) input points in pixel units
    grid = src / torch.tensor([W / 2.0, H / 2.0], device=x.device, dtype=dt) - 1.0  # align_corners=False normalisation
    ones = torch.ones(M, 1, H, W, device=x.device, dtype=dt)
    out = F.grid_sample(torch.cat([x, ones], 1), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    img, mask = out[:, :C], out[:, C:]
    return torch.where(mask < 0.5, torch.full_like(img, fill), img)


def _cubic_rows(x: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """PIL's affine bicubic along the last axis, at input points ``src``, black outside.

    Args:
        x: ``(M, C, H, W)`` images.
        src: ``(M, H, W)`` the input column coordinate (pixel units, pixel centres at ``k + 0.5``)
            each output pixel samples in its own row.

    PIL (``Geometry.c``: ``BICUBIC_HEAD``/``BICUBIC``): a point outside ``[0, W)`` gives the fill;
    otherwise ``s = src - 0.5``, ``k = floor(s)``, ``d = s - k`` and the taps ``k-1 .. k+2`` (clamped to
    the image) are combined as ``v2 + d (v3 - v1) + d^2 (2 (v1 - v2) + v3 - v4) + d^3 (-v1 + v2 - v3 + v4)``,
    the cubic convolution kernel with ``a = -1``. Here the result is clamped to ``[0, 1]`` and
    not rounded to 8 bits.
    """
    M, C, H, W = x.shape
    inside = (src >= 0) & (src < W)  # (M, H, W)
    s = src - 0.5
    k = torch.floor(s)
    d = (s - k)[:, None]  # (M, 1, H, W)
    k = k.to(torch.long)
    taps = [x.gather(3, (k + o).clamp(0, W - 1)[:, None].expand(M, C, H, W)) for o in (-1, 0, 1, 2)]
    v1, v2, v3, v4 = taps
    out = v2 + d * ((v3 - v1) + d * ((2 * (v1 - v2) + v3 - v4) + d * (-v1 + v2 - v3 + v4)))
    return torch.where(inside[:, None], out.clamp(0.0, 1.0), torch.zeros_like(out))


# ---- the ops ---------------------------------------------------------------------------------------
def shear_x(x: torch.Tensor, k: torch.Tensor | float) -> torch.Tensor:
    """ATS ``shearX``: ``Image.transform(AFFINE, (1, k, 0, 0, 1, 0), BICUBIC, fillcolor=0)``.

    The output pixel centre ``(u, v)`` samples the input at ``(u + k v, v)``: a shear about the
    top-left corner. ``k (...)`` is the signed shear (ATS: ``+-m``, ``m`` up to 0.3).
    """
    xf, kf, _ = _flat(x, k)
    M, C, H, W = xf.shape
    u = torch.arange(W, device=x.device, dtype=xf.dtype) + 0.5
    v = torch.arange(H, device=x.device, dtype=xf.dtype) + 0.5
    src = u[None, None, :] + kf.to(xf.dtype)[:, None, None] * v[None, :, None]  # (M, H, W)
    return _cubic_rows(xf, src).reshape(x.shape)


def shear_y(x: torch.Tensor, k: torch.Tensor | float) -> torch.Tensor:
    """ATS ``shearY``: ``(1, 0, 0, k, 1, 0)``, the output ``(u, v)`` samples ``(u, v + k u)``
    (``shear_x`` of the transposed image)."""
    return shear_x(x.transpose(-1, -2), k).transpose(-1, -2)


def _translate(x: torch.Tensor, frac: torch.Tensor | float, axis: int) -> torch.Tensor:
    """Shift by ``frac`` of the width (``axis`` 0) or height (``axis`` 1), nearest, black fill."""
    xf, ff, _ = _flat(x, frac)
    size = xf.shape[3] if axis == 0 else xf.shape[2]
    inv = torch.zeros(xf.shape[0], 2, 3, device=x.device, dtype=xf.dtype)
    inv[:, 0, 0] = inv[:, 1, 1] = 1.0
    inv[:, axis, 2] = ff.to(xf.dtype) * size
    return _affine_nearest(xf, inv, 0.0).reshape(x.shape)


def translate_x(x: torch.Tensor, frac: torch.Tensor | float) -> torch.Tensor:
    """ATS ``translateX``: ``(1, 0, frac * W, 0, 1, 0)``, nearest, black fill; the output pixel
    ``u`` samples ``u + frac * W``, so a positive ``frac`` moves the content left."""
    return _translate(x, frac, 0)


def translate_y(x: torch.Tensor, frac: torch.Tensor | float) -> torch.Tensor:
    """ATS ``translateY``: ``(1, 0, 0, 0, 1, frac * H)``, nearest, black fill."""
    return _translate(x, frac, 1)


ROTATE_FILL = 128 / 255  # rotate_with_fill composites the rotated image onto (128, 128, 128, 128)


def rotate(x: torch.Tensor, degrees: torch.Tensor | float) -> torch.Tensor:
    """ATS ``rotate``: ``Image.rotate(degrees)`` (counter-clockwise about the centre, nearest),
    outside filled with grey 128.

    PIL's inverse map: ``(u, v) -> R(-theta) ((u, v) - c) + c`` with ``c = (W/2, H/2)``, i.e.
    ``u' = cos t (u - cx) - sin t (v - cy) + cx``, ``v' = sin t (u - cx) + cos t (v - cy) + cy``
    (``v`` points down, so this turns the content counter-clockwise on screen).
    """
    xf, df, _ = _flat(x, degrees)
    M, _, H, W = xf.shape
    t = torch.deg2rad(df.to(torch.float64))
    c, s = torch.cos(t), torch.sin(t)
    cx, cy = W / 2.0, H / 2.0
    inv = torch.stack([torch.stack([c, -s, cx - c * cx + s * cy], -1),
                       torch.stack([s, c, cy - s * cx - c * cy], -1)], 1)  # (M, 2, 3)
    return _affine_nearest(xf, inv.to(xf.dtype), ROTATE_FILL).reshape(x.shape)


def color(x: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """ATS ``color`` (``ImageEnhance.Color``): blend with the grayscale image; the identity for
    1-channel images (torchvision ``adjust_saturation``)."""
    xf, ff, _ = _flat(x, factor)
    if xf.shape[-3] == 1:
        return x.clone()
    return _blend(xf, _grayscale(xf), ff).reshape(x.shape)


def contrast(x: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """ATS ``contrast`` (``ImageEnhance.Contrast``): blend with the image's mean grey level
    (torchvision ``adjust_contrast``; PIL rounds that mean to an 8-bit level)."""
    xf, ff, _ = _flat(x, factor)
    mean = _grayscale(xf).mean(dim=(-3, -2, -1), keepdim=True)  # (M, 1, 1, 1)
    return _blend(xf, mean, ff).reshape(x.shape)


def brightness(x: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """ATS ``brightness`` (``ImageEnhance.Brightness``): blend with black, ``factor * x``."""
    xf, ff, _ = _flat(x, factor)
    return _blend(xf, torch.zeros((), device=x.device, dtype=xf.dtype), ff).reshape(x.shape)


def sharpness(x: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """ATS ``sharpness`` (``ImageEnhance.Sharpness``): blend with PIL's ``SMOOTH`` filter
    (3x3 kernel ``[[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13``), border pixels kept (torchvision
    ``adjust_sharpness``)."""
    xf, ff, _ = _flat(x, factor)
    M, C, H, W = xf.shape
    if H <= 2 or W <= 2:
        return x.clone()
    kernel = torch.ones(3, 3, device=x.device, dtype=xf.dtype) / 13.0
    kernel[1, 1] = 5.0 / 13.0
    smooth = F.conv2d(xf, kernel.expand(C, 1, 3, 3), groups=C)  # (M, C, H - 2, W - 2)
    degenerate = xf.clone()
    degenerate[..., 1:-1, 1:-1] = smooth
    return _blend(xf, degenerate, ff).reshape(x.shape)


def posterize(x: torch.Tensor, bits: torch.Tensor | int) -> torch.Tensor:
    """ATS ``posterize`` (``ImageOps.posterize``): keep the top ``bits`` bits of each 8-bit level."""
    xf, bf, _ = _flat(x, bits)
    mask = (255 - ((1 << (8 - bf.to(torch.long))) - 1))[:, None, None, None]  # (M, 1, 1, 1)
    return ((_levels(xf) & mask).to(xf.dtype) / 255.0).reshape(x.shape)


def solarize(x: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """ATS ``solarize`` (``ImageOps.solarize``): levels ``>= threshold`` (on the 0..256 scale) are
    inverted; 256 leaves the image unchanged."""
    xf, tf, _ = _flat(x, threshold)
    t = (tf.to(xf.dtype) / 255.0)[:, None, None, None]
    return torch.where(xf >= t, 1.0 - xf, xf).reshape(x.shape)


def autocontrast(x: torch.Tensor, _: torch.Tensor | float = 0.0) -> torch.Tensor:
    """ATS ``autocontrast`` (``ImageOps.autocontrast``, cutoff 0): each channel stretched from
    ``[min, max]`` to ``[0, 1]``; a constant channel is kept (torchvision ``autocontrast``)."""
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    flat = hi <= lo
    lo = torch.where(flat, torch.zeros_like(lo), lo)
    scale = torch.where(flat, torch.ones_like(hi), hi - lo)
    return ((x - lo) / scale).clamp(0.0, 1.0)


def equalize(x: torch.Tensor, _: torch.Tensor | float = 0.0) -> torch.Tensor:
    """ATS ``equalize`` (``ImageOps.equalize``): per channel, on the 8-bit levels, PIL's lookup
    table ``lut[i] = (step // 2 + #{pixels below level i}) // step`` with
    ``step = (#pixels - #pixels at the top level) // 255``; ``step == 0`` keeps the channel."""
    shape = x.shape
    H, W = shape[-2:]
    lv = _levels(x).reshape(-1, H * W)  # (M*C, P)
    hist = torch.zeros(lv.shape[0], 256, dtype=torch.long, device=x.device).scatter_add_(1, lv, torch.ones_like(lv))
    top = hist.gather(1, lv.amax(dim=1, keepdim=True))  # (M*C, 1) pixels at the top level
    step = (H * W - top) // 255
    below = torch.cumsum(hist, 1) - hist  # (M*C, 256) pixels strictly below each level
    safe = step.clamp(min=1)
    lut = ((safe // 2 + below) // safe).clamp(max=255)
    lut = torch.where(step > 0, lut, torch.arange(256, device=x.device)[None, :])
    return (lut.gather(1, lv).to(x.dtype) / 255.0).reshape(shape)


def invert(x: torch.Tensor, _: torch.Tensor | float = 0.0) -> torch.Tensor:
    """ATS ``invert`` (``ImageOps.invert``): ``1 - x``."""
    return 1.0 - x


OpFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
OPS: dict[str, OpFn] = {
    "shearX": shear_x, "shearY": shear_y, "translateX": translate_x, "translateY": translate_y, "rotate": rotate,
    "color": color, "posterize": posterize, "solarize": solarize, "contrast": contrast, "sharpness": sharpness,
    "brightness": brightness, "autocontrast": autocontrast, "equalize": equalize, "invert": invert,
}
SIGNED = ("shearX", "shearY", "translateX", "translateY", "color", "contrast", "sharpness", "brightness")
FACTOR = ("color", "contrast", "sharpness", "brightness")  # parameter 1 + sign * m


def magnitude(op: str, level: int) -> float:
    """ATS's ``ranges[op][level]`` (``autoaugment.py``: 10-step ``np.linspace`` per op)."""
    def lin(lo: float, hi: float) -> float:
        return lo + level * (hi - lo) / 9

    if op in ("shearX", "shearY"):
        return lin(0.0, 0.3)
    if op in ("translateX", "translateY"):
        return lin(0.0, 150 / 331)  # a fraction of the image size
    if op == "rotate":
        return lin(0.0, 30.0)  # degrees
    if op in FACTOR:
        return lin(0.0, 0.5)
    if op == "posterize":
        return float(round(lin(8.0, 4.0)))  # np.round(...).astype(int): bits kept
    if op == "solarize":
        return lin(256.0, 0.0)  # threshold on the 0..256 scale
    return 0.0  # autocontrast, equalize, invert take no magnitude


@dataclass(frozen=True)
class SubPolicy:
    """One of ATS's sub-policies: ``SubPolicy(prob, op, level)``."""

    prob: float  # the listed probability (ATS never reads it; see ``use_prob``)
    op: str
    level: int  # index into the op's 10-step magnitude range

    @property
    def magnitude(self) -> float:
        return magnitude(self.op, self.level)

    def value(self, sign: torch.Tensor) -> torch.Tensor:
        """The op's per-image parameter for signs ``sign (...)`` in ``{-1, +1}``."""
        m = self.magnitude
        if self.op in FACTOR:
            return 1.0 + sign * m
        if self.op in SIGNED:
            return sign * m
        return torch.full_like(sign, m)


# ATSPrivacy policy.py, in order (index = sub-policy id); the toolkit's transformation.py is the same list
SUB_POLICIES: tuple[SubPolicy, ...] = tuple(SubPolicy(p, op, lv) for p, op, lv in (
    (0.1, "invert", 7), (0.2, "contrast", 6), (0.7, "rotate", 2), (0.3, "translateX", 9), (0.8, "sharpness", 1),
    (0.9, "sharpness", 3), (0.5, "shearY", 2), (0.7, "translateY", 2), (0.5, "autocontrast", 5), (0.9, "equalize", 2),
    (0.2, "shearY", 5), (0.3, "posterize", 5), (0.4, "color", 3), (0.6, "brightness", 5), (0.3, "sharpness", 9),
    (0.7, "brightness", 9), (0.6, "equalize", 5), (0.5, "equalize", 1), (0.6, "contrast", 7), (0.6, "sharpness", 5),
    (0.7, "color", 5), (0.5, "translateX", 5), (0.3, "equalize", 7), (0.4, "autocontrast", 8), (0.4, "translateY", 3),
    (0.2, "sharpness", 6), (0.9, "brightness", 6), (0.2, "color", 8), (0.5, "solarize", 0), (0.0, "invert", 0),
    (0.2, "equalize", 0), (0.6, "autocontrast", 0), (0.2, "equalize", 8), (0.6, "equalize", 4), (0.9, "color", 5),
    (0.6, "equalize", 5), (0.8, "autocontrast", 4), (0.2, "solarize", 4), (0.1, "brightness", 3), (0.7, "color", 0),
    (0.4, "solarize", 1), (0.9, "autocontrast", 0), (0.9, "translateY", 3), (0.7, "translateY", 3), (0.9, "autocontrast", 1),
    (0.8, "solarize", 1), (0.8, "equalize", 5), (0.1, "invert", 0), (0.7, "translateY", 3), (0.9, "autocontrast", 1),
))

# {(list name, model): policies, best first}. The first four are the toolkit's
# defense/policy_list_{name}.csv. ("fashion_mnist", "cnn") is our own search for 1-channel 28x28
# images: the top 5 kept policies of docs/results/ats_search_fashion_mnist_cnn.csv, written by
# `spfl ats-search --dataset fashion_mnist --model cnn --num_candidates 96` (seed 0, --max_len 3,
# --threshold -85, --train_steps 100; 94 of 96 kept, ranked by ascending S_pri). Its policy 0,
# 11-37-12, posterizes to 6 bits and solarizes at level 142 (colour is the identity on 1 channel).
# The toolkit's mnistRGB list barely changes FashionMNIST images (41-11-31 stays 48 dB from the
# original), so it no longer serves them; --ats_list mnistRGB still selects it.
POLICY_LISTS: dict[tuple[str, str], tuple[str, ...]] = {
    ("mnistRGB", "convnet"): ("41-11-31", "34-11-36", "11-41-28", "11-28-49", "11-39-8"),
    ("cifar10", "convnet"): ("3-3-0", "3-17-15", "3-21-19"),
    ("cifar100", "resnet20"): ("3-1-7", "43-18-18"),
    ("cifar100", "convnet"): ("3-1-3", "21-13-3"),
    ("fashion_mnist", "cnn"): ("11-37-12", "27-4-37", "45-38-15", "15-20-13", "41-31-15"),
}
# where each list comes from, for the run's description
LIST_ORIGINS: dict[str, str] = {
    "mnistRGB": "the toolkit's list (defense/policy_list_*.csv)",
    "cifar10": "the toolkit's list (defense/policy_list_*.csv)",
    "cifar100": "the toolkit's list (defense/policy_list_*.csv)",
    "fashion_mnist": "our search's list (docs/results/ats_search_fashion_mnist_cnn.csv)",
}


def parse_policy(text: str) -> Policy:
    """``"3-1-7"`` -> ``(3, 1, 7)``; anything else is a one-line :class:`ConfigError`."""
    parts = str(text).strip().split("-")
    if not all(p.strip().isdigit() for p in parts):
        raise ConfigError(f"ATS policy {text!r} is not a list of sub-policy ids like 3-1-7")
    ids = tuple(int(p) for p in parts)
    bad = [i for i in ids if i >= len(SUB_POLICIES)]
    if bad:
        raise ConfigError(f"ATS policy {text!r}: unknown sub-policy id {bad[0]}; ids are 0..{len(SUB_POLICIES) - 1}")
    return ids


def parse_policies(text: str) -> tuple[Policy, ...]:
    """``"3-1-7+43-18-18"`` (ATS's hybrid notation) -> one policy per ``+``-separated part."""
    return tuple(parse_policy(p) for p in str(text).split("+"))


def policy_name(policy: Policy) -> str:
    return "-".join(str(i) for i in policy)


def describe_policy(policy: Policy) -> str:
    """``"3-1-7"`` -> ``"translateX 0.453, contrast 0.333, translateY 0.101"`` (op and magnitude)."""
    return ", ".join(f"{SUB_POLICIES[i].op} {SUB_POLICIES[i].magnitude:.3g}" for i in policy)


def num_draws(policies: Sequence[Policy]) -> int:
    """Uniform numbers :func:`apply_policy` needs per image: the policy choice, then a sign and
    a probability gate per op slot."""
    return 1 + 2 * max(len(p) for p in policies)


def draw_uniforms(lead: Sequence[int], policies: Sequence[Policy], generator: torch.Generator,
                  device: Optional[torch.device | str] = None) -> torch.Tensor:
    """``(*lead, num_draws)`` uniforms in ``[0, 1)`` from ``generator`` (for :func:`apply_policy`)."""
    u = torch.rand(*lead, num_draws(policies), generator=generator, dtype=torch.float64)
    return u.to(device) if device is not None else u


def apply_policy(x: torch.Tensor, policies: Sequence[Policy], u: torch.Tensor, use_prob: bool = False) -> torch.Tensor:
    """Each image draws one of ``policies`` and goes through its ops, with its own signs.

    Args:
        x: ``(..., C, H, W)`` images in ``[0, 1]``, e.g. ``(n clients, B, C, H, W)``.
        policies: One policy (ATS ``--aug_list``, the toolkit's ``--augid``), or several that
            each image chooses from uniformly (ATS's ``+`` hybrid, the toolkit's ``--topn``
            ``PolicyHybrid``).
        u: ``(..., num_draws(policies))`` uniforms in ``[0, 1)`` per image: ``u[..., 0]`` picks
            the policy, ``u[..., 1 + l]`` the sign of op ``l`` (``+1`` below 0.5), and
            ``u[..., 1 + L + l]`` gates op ``l`` against its listed probability when ``use_prob``.
        use_prob: Apply op ``l`` only where ``u[..., 1 + L + l] < prob`` (ATS applies every op).

    Returns:
        ``(..., C, H, W)``; every image is transformed on its own, so the result for an image
        does not depend on the other images in ``x``.
    """
    lead, chw = x.shape[:-3], x.shape[-3:]
    L = max(len(p) for p in policies)
    if u.shape != (*lead, 1 + 2 * L):
        raise ValueError(f"u must have shape {(*lead, 1 + 2 * L)}, got {tuple(u.shape)}")
    out = x.reshape(-1, *chw)
    uf = u.reshape(-1, 1 + 2 * L).to(x.device)
    choice = (uf[:, 0] * len(policies)).to(torch.long).clamp(max=len(policies) - 1)  # (M,)
    sign = torch.where(uf[:, 1 : 1 + L] < 0.5, 1.0, -1.0).to(x.dtype)  # (M, L)
    for slot in range(L):
        for sub_id in sorted({p[slot] for p in policies if len(p) > slot}):
            sub = SUB_POLICIES[sub_id]
            chosen = [k for k, p in enumerate(policies) if len(p) > slot and p[slot] == sub_id]
            hit = (choice[:, None] == torch.tensor(chosen, device=x.device)[None, :]).any(1)  # (M,)
            if use_prob:
                hit = hit & (uf[:, 1 + L + slot] < sub.prob)
            value = sub.value(sign[:, slot])  # (M,)
            if bool(hit.all()):
                out = OPS[sub.op](out, value)
            elif bool(hit.any()):
                idx = hit.nonzero().squeeze(1)
                out = out.index_put((idx,), OPS[sub.op](out[idx], value[idx]))
    return out.reshape(x.shape)


__all__ = [
    "LIST_ORIGINS", "OPS", "POLICY_LISTS", "Policy", "ROTATE_FILL", "SUB_POLICIES", "SubPolicy", "apply_policy", "autocontrast",
    "brightness", "color", "contrast", "describe_policy", "draw_uniforms", "equalize", "invert", "magnitude",
    "num_draws", "parse_policies", "parse_policy", "policy_name", "posterize", "rotate", "sharpness", "shear_x",
    "shear_y", "solarize", "translate_x", "translate_y",
]
