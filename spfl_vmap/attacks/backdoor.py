"""Backdoor (trigger) poisoning as pure tensor functions: triggers, poisoned positions, ASR.

A backdoor attacker stamps a small pixel pattern (the *trigger*) on part of its training
images and relabels them to a target class, so that the trained model maps any triggered image
to the target while its clean accuracy stays intact (BadNets: Gu et al., "BadNets: Identifying
Vulnerabilities in the Machine Learning Model Supply Chain", 2017). In federated learning the
attacker's update may also be scaled up ("model replacement", Bagdasaryan et al., "How To
Backdoor Federated Learning", AISTATS 2020), and the trigger may be split into local pieces
that different attackers embed (DBA: Xie et al., "DBA: Distributed Backdoor Attacks against
Federated Learning", ICLR 2020).

Shapes: ``n`` clients of a chunk, ``B`` batch slots, images ``(C, H, W)``. Triggers are boolean
masks ``(H, W)`` applied to every channel with one value per channel.

Triggers (:func:`trigger_mask`):

* ``square``: an ``s x s`` square at a corner (``top_left``, ``top_right``, ``bottom_left``,
  ``bottom_right``), the ``center``, or at ``(row, col)`` (its top-left pixel). FLPoison and
  BackFed put a 5x5 / 4x4 square bottom-right.
* ``plus``: the authors' toolkit trigger (csl-cqu/Roubst-and-Privacy-preserving-Federated-
  Learning-System ``modules/backdoor_defense/utils/mnist.py``): a 3x3 plus centred at pixel
  (2, 2), i.e. flattened 28x28 indices 30, 57, 58, 59, 86.
* ``rlr_plus``: the FashionMNIST plus of the RLR code (Ozdayi et al., "Defending against
  Backdoors in Federated Learning with Robust Learning Rate", AAAI 2021;
  ``src/utils.py::add_pattern_bd``, ``start_idx 5, size 5``): rows 5-9 of column 5 plus
  columns 3-7 of row 7, a 9-pixel plus of arm 2 centred at (7, 5).

The trigger value is the data range's maximum after normalization (the toolkit uses the batch
maximum ``t.max()``, RLR 255 before normalization); callers pass it in, a scalar or ``(C,)``.

Attack rounds (:func:`parse_schedule`): ``continuous`` (every round), ``single:R`` (round ``R``
only, a single-shot attack), ``every:K`` (rounds 1, K+1, 2K+1, ...: FLPoison's fixed-frequency
strategy, ``attackers/pbases/dpbase.py::generate_poison_epochs``, ``range(0, epochs, K)`` over
0-based rounds) and ``from:R`` (every round from ``R`` on). Rounds are 1-based, as in the run log.

Neurotoxin (:func:`neurotoxin_keep`): the coordinates of a benign direction with the smallest
magnitudes, which the attacker keeps (Zhang et al., "Neurotoxin: Durable Backdoors in Federated
Learning", ICML 2022).

Poisoned positions (:func:`poison_rows`): in each malicious client's batch, the
``floor(frac * m)`` eligible slots with the lowest scores, where ``m`` is the number of eligible
slots (all ``B`` for all-to-one; the source-class samples for one-to-one, as RLR's
``poison_frac`` counts the attacker's source-class images). Scores are uniform draws from a
generator, or given (:func:`hash_uniform` of the sample, for draws that do not depend on how a
caller batches its clients).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from ..errors import ConfigError

TRIGGERS = ("square", "plus", "rlr_plus")
CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right", "center")
DBA_PARTS = 4  # Xie et al. 2020 split the global trigger into 4 local triggers

Location = Union[str, tuple[int, int]]

MASK32 = 0xFFFFFFFF
EPS_FRAC = 1e-9  # floor(frac * m) without float noise (0.29 * 100 = 28.999...)


# ---- triggers ---------------------------------------------------------------------------------
def parse_location(text: Location) -> Location:
    """``"bottom_right"`` -> ``"bottom_right"``; ``"3,5"`` or ``(3, 5)`` -> ``(3, 5)``.

    Raises:
        ConfigError: neither a known corner name nor two integers.
    """
    if isinstance(text, tuple):
        return (int(text[0]), int(text[1]))
    if text in CORNERS:
        return text
    parts = text.replace("(", "").replace(")", "").split(",")
    try:
        if len(parts) == 2:
            return (int(parts[0]), int(parts[1]))
    except ValueError:
        pass
    raise ConfigError(f"trigger location {text!r} must be one of {', '.join(CORNERS)} or 'row,col'")


def square_mask(height: int, width: int, size: int, location: Location = "bottom_right", margin: int = 0) -> torch.Tensor:
    """A ``size x size`` square trigger (BadNets, Gu et al. 2017).

    Args:
        height, width: The image size ``H, W``.
        size: Side ``s`` of the square.
        location: A corner name or ``center``, or ``(row, col)`` of the square's top-left pixel.
        margin: Pixels between a corner square and the image border.

    Returns:
        ``(H, W)`` bool mask with ``s * s`` pixels set.

    Raises:
        ConfigError: the square does not fit inside the image.
    """
    if size < 1:
        raise ConfigError(f"trigger size must be >= 1, got {size}")
    loc = parse_location(location)
    if isinstance(loc, tuple):
        r, c = loc
    else:
        r = {"top": margin, "bottom": height - size - margin, "center": (height - size) // 2}[loc.split("_")[0]]
        c = {"left": margin, "right": width - size - margin, "center": (width - size) // 2}[loc.split("_")[-1]]
    if r < 0 or c < 0 or r + size > height or c + size > width:
        raise ConfigError(f"a {size}x{size} trigger at {location!r} does not fit in a {height}x{width} image")
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[r : r + size, c : c + size] = True
    return mask


def plus_mask(height: int, width: int, center: tuple[int, int] = (2, 2), arm: int = 1) -> torch.Tensor:
    """A plus-shaped trigger: row ``center[0]`` and column ``center[1]``, ``arm`` pixels each way.

    The defaults are the authors' toolkit trigger (3x3 plus centred at (2, 2): 28x28 flattened
    indices 30, 57, 58, 59, 86); ``center=(7, 5), arm=2`` is RLR's FashionMNIST plus.

    Returns:
        ``(H, W)`` bool mask with ``4 * arm + 1`` pixels set.

    Raises:
        ConfigError: the plus does not fit inside the image.
    """
    r, c = center
    if r - arm < 0 or c - arm < 0 or r + arm >= height or c + arm >= width:
        raise ConfigError(f"a plus trigger of arm {arm} centred at {center} does not fit in a {height}x{width} image")
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[r - arm : r + arm + 1, c] = True
    mask[r, c - arm : c + arm + 1] = True
    return mask


def trigger_mask(name: str, height: int, width: int, size: int = 3, location: Location = "bottom_right") -> torch.Tensor:
    """The named trigger (``square`` | ``plus`` | ``rlr_plus``) for ``H x W`` images.

    ``size`` and ``location`` apply to ``square`` only; the two plus triggers are fixed patterns
    (see the module docstring).

    Returns:
        ``(H, W)`` bool mask.

    Raises:
        ConfigError: unknown name, or a trigger that does not fit inside the image.
    """
    if name == "square":
        return square_mask(height, width, size, location)
    if name == "plus":
        return plus_mask(height, width, (2, 2), 1)
    if name == "rlr_plus":
        return plus_mask(height, width, (7, 5), 2)
    raise ConfigError(f"unknown trigger {name!r}; choose one of: {', '.join(TRIGGERS)}")


def dba_parts(mask: torch.Tensor, parts: int = DBA_PARTS) -> torch.Tensor:
    """Split a global trigger into ``parts`` local triggers (DBA, Xie et al. 2020).

    The trigger's pixels, in row-major order, are cut into ``parts`` contiguous groups of
    near-equal size (the first groups get one pixel more). For a DBA-style global pattern of
    ``parts`` strips (the paper's 4 local 1x4 bars in two rows) this gives back the strips; a
    4x4 square gives its 4 rows; a 3x3 square gives 3, 2, 2 and 2 pixels. The parts are disjoint
    and their union is ``mask`` (the full trigger used at test time).

    Args:
        mask: ``(H, W)`` bool global trigger.
        parts: Number of local triggers.

    Returns:
        ``(parts, H, W)`` bool local triggers, none empty.

    Raises:
        ConfigError: the trigger has fewer pixels than ``parts``.
    """
    flat = mask.reshape(-1).nonzero().squeeze(1)  # (P,) row-major pixel indices
    if parts < 1 or flat.numel() < parts:
        raise ConfigError(f"a trigger of {flat.numel()} pixels cannot be split into {parts} DBA parts")
    out = torch.zeros(parts, mask.numel(), dtype=torch.bool, device=mask.device)
    for i, idx in enumerate(torch.tensor_split(flat, parts)):
        out[i, idx] = True
    return out.reshape(parts, *mask.shape)


def apply_trigger(x: torch.Tensor, mask: torch.Tensor, value: Union[float, torch.Tensor]) -> torch.Tensor:
    """Stamp a trigger on images, vectorized over any leading dimensions.

    Args:
        x: ``(..., C, H, W)`` images.
        mask: ``(H, W)`` bool trigger, or any shape broadcastable to ``x.shape[:-3] + (H, W)``
            (e.g. ``(n, 1, H, W)``: one trigger per client of ``x (n, B, C, H, W)``).
        value: The trigger value: a scalar, or ``(C,)`` one per channel.

    Returns:
        A new tensor shaped like ``x`` with the masked pixels of every channel set to ``value``.
    """
    m = mask.to(device=x.device, dtype=torch.bool).unsqueeze(-3)  # (..., 1, H, W)
    v = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    if v.dim() == 1:
        v = v[:, None, None]  # (C, 1, 1)
    return torch.where(m, v, x)


# ---- which positions are poisoned -------------------------------------------------------------
def poison_count(frac: float, m: torch.Tensor) -> torch.Tensor:
    """``floor(frac * m)`` poisoned slots out of ``m`` eligible ones (integer tensor)."""
    return torch.floor(frac * m.to(torch.float64) + EPS_FRAC).to(torch.long)


def poison_rows(
    malicious: torch.Tensor,
    batch_size: int,
    frac: float,
    *,
    eligible: Optional[torch.Tensor] = None,
    scores: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Which batch slots of which clients are poisoned, for a chunk of ``n`` clients at once.

    In every malicious row, the ``floor(frac * m)`` eligible slots with the lowest scores
    (ties: the lower slot), ``m`` = the row's eligible slots; nothing in benign rows.

    Args:
        malicious: ``(n,)`` bool.
        batch_size: ``B``.
        frac: Fraction of each malicious batch's eligible slots to poison, in ``[0, 1]``.
        eligible: ``(n, B)`` bool slots that may be poisoned (one-to-one: ``y == source``);
            ``None`` = all.
        scores: ``(n, B)`` float ranking keys; ``None`` = ``torch.rand`` from ``generator``
            (a uniformly random subset of the eligible slots).
        generator: Source of the scores when ``scores`` is ``None`` (``None`` = seed 0).

    Returns:
        ``(n, B)`` bool.
    """
    n, B = malicious.shape[0], batch_size
    dev = malicious.device
    if scores is None:
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        scores = torch.rand(n, B, generator=generator, device=generator.device).to(dev)
    ok = torch.ones(n, B, dtype=torch.bool, device=dev) if eligible is None else eligible.to(dev)
    keyed = torch.where(ok, scores.to(torch.float64), torch.full_like(scores, math.inf, dtype=torch.float64))
    order = keyed.argsort(dim=1, stable=True)  # (n, B) slots by score
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(B, device=dev).expand(n, B))  # (n, B)
    k = poison_count(frac, ok.sum(dim=1))  # (n,)
    return malicious[:, None] & ok & (rank < k[:, None])


def poison_rows_reference(
    malicious: torch.Tensor, batch_size: int, frac: float, scores: torch.Tensor, eligible: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Per-client Python reference of :func:`poison_rows` with given ``scores`` (tests)."""
    n, B = malicious.shape[0], batch_size
    out = torch.zeros(n, B, dtype=torch.bool)
    for i in range(n):
        if not bool(malicious[i]):
            continue
        slots = [j for j in range(B) if eligible is None or bool(eligible[i, j])]
        k = math.floor(frac * len(slots) + EPS_FRAC)
        for j in sorted(slots, key=lambda j: (float(scores[i, j]), j))[:k]:
            out[i, j] = True
    return out


def poison_batch(
    x: torch.Tensor, y: torch.Tensor, poisoned: torch.Tensor, mask: torch.Tensor, value: Union[float, torch.Tensor], target: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Trigger and relabel the poisoned slots; the rest of the batch is unchanged.

    Args:
        x: ``(n, B, C, H, W)`` images.
        y: ``(n, B)`` labels.
        poisoned: ``(n, B)`` bool (from :func:`poison_rows`).
        mask: ``(H, W)`` trigger, or ``(n, 1, H, W)`` one per client (DBA's local triggers).
        value: Trigger value, scalar or ``(C,)``.
        target: The backdoor's target label.

    Returns:
        ``(x', y')`` with the shapes of ``(x, y)``.
    """
    m = mask.to(device=x.device, dtype=torch.bool).unsqueeze(-3)  # (1, H, W) or (n, 1, 1, H, W)
    hit = poisoned[..., None, None, None] & m  # (n, B, 1, H, W): the trigger's pixels of poisoned slots
    v = torch.as_tensor(value, dtype=x.dtype, device=x.device).reshape(-1, 1, 1)  # (C or 1, 1, 1)
    x2 = torch.where(hit, v, x)  # one pass over the batch
    y2 = torch.where(poisoned, torch.full_like(y, target), y)
    return x2, y2


# ---- hashing: draws that depend on the sample, not on how clients are batched ----------------
def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for ``x`` in ``[0, 2**32)`` without int64 overflow."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finalizer (C. Wellons' ``lowbias32``) on int64 tensors in ``[0, 2**32)``."""
    x = x & MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _fold(k: torch.Tensor) -> torch.Tensor:
    k = k.to(torch.long)
    return (k ^ (k >> 32)) & MASK32


def _mix32_int(x: int) -> int:
    """:func:`mix32` of one Python int (a seed: no tensor ops)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def hash_uniform(seed: int, *keys: torch.Tensor) -> torch.Tensor:
    """A uniform number in ``[0, 1)`` per element, a hash of ``seed`` and the integer ``keys``.

    ``h = mix32(seed)``, then ``h = mix32(h ^ (fold(k) + golden))`` for each key (a chained
    hash-combine; one finalizer per key).

    Args:
        seed: Any integer (e.g. ``derive_seed(seed, "backdoor", round)``).
        *keys: Integer tensors, broadcast together.

    Returns:
        float64 tensor of the broadcast shape; equal keys give equal numbers on every device
        and for every way of slicing the keys.
    """
    h: torch.Tensor | int = _mix32_int((seed ^ (seed >> 32)) & MASK32)
    for k in keys:
        h = mix32(h ^ ((_fold(k) + 0x9E3779B9) & MASK32))
    shape = torch.broadcast_shapes(*(k.shape for k in keys))
    return torch.as_tensor(h).expand(shape).to(torch.float64) / float(1 << 32)


_PIXEL_WEIGHTS: dict[tuple[int, str], torch.Tensor] = {}


def _pixel_weights(p: int, device: torch.device) -> torch.Tensor:
    """``(P,)`` odd int64 weights below ``2**16``, one per pixel position (cached)."""
    key = (p, str(device))
    if key not in _PIXEL_WEIGHTS:
        w = mix32(torch.arange(p, dtype=torch.long) + 0x632BE5AB) & 0xFFFF | 1
        _PIXEL_WEIGHTS[key] = w.to(device)
    return _PIXEL_WEIGHTS[key]


def content_keys(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """An integer key per sample, from the exact bits of its pixels and its label.

    A weighted sum of the pixels' 32-bit patterns with odd per-position weights below
    ``2**16`` (exact in int64 for up to ``2**15`` pixels), folded to 32 bits and finalized
    together with the label. Two ops over the pixels, so it stays cheap inside every local step.

    Args:
        x: ``(..., C, H, W)`` float images.
        y: ``(...)`` labels.

    Returns:
        ``(...)`` int64 in ``[0, 2**32)``; exact integer arithmetic, so it does not depend on how
        many samples are hashed together.
    """
    lead = x.shape[:-3]
    bits = x.float().contiguous().view(torch.int32).reshape(*lead, -1).to(torch.long) & MASK32  # (..., P)
    key = _fold((bits * _pixel_weights(bits.shape[-1], x.device)).sum(dim=-1))  # (...,)
    return mix32(key ^ ((y.to(torch.long) * 0x85EBCA6B) & MASK32))


# ---- when the attackers act, and on which coordinates ------------------------------------------
SCHEDULES = ("continuous", "single:R", "every:K", "from:R")


@dataclass(frozen=True)
class Schedule:
    """The rounds in which backdoor attackers act.

    Attributes:
        kind: ``continuous`` | ``single`` | ``every`` | ``from``.
        n: The round ``R`` (``single``, ``from``) or the period ``K`` (``every``); 0 for
            ``continuous``.
    """

    kind: str
    n: int = 0

    def active(self, round_idx: int) -> bool:
        """Whether the attackers act in 1-based round ``round_idx``."""
        if self.kind == "continuous":
            return True
        if self.kind == "single":
            return round_idx == self.n
        if self.kind == "from":
            return round_idx >= self.n
        return (round_idx - 1) % self.n == 0  # every: rounds 1, K+1, 2K+1, ... (FLPoison's range(0, T, K))

    def __str__(self) -> str:
        return self.kind if self.kind == "continuous" else f"{self.kind}:{self.n}"


def parse_schedule(text: str) -> Schedule:
    """``"continuous"``, ``"single:R"``, ``"every:K"`` or ``"from:R"`` -> :class:`Schedule`.

    Raises:
        ConfigError: (one line) any other text, or ``R`` / ``K`` not an integer >= 1.
    """
    t = text.strip().lower()
    if t == "continuous":
        return Schedule("continuous")
    kind, sep, num = t.partition(":")
    if sep and kind in ("single", "every", "from"):
        try:
            n = int(num)
        except ValueError:
            n = 0
        if n >= 1:
            return Schedule(kind, n)
        raise ConfigError(f"schedule {text!r}: {'the period K' if kind == 'every' else 'the round R'} must be an integer >= 1")
    raise ConfigError(f"schedule {text!r} must be one of: {', '.join(SCHEDULES)}")


def neurotoxin_keep(direction: torch.Tensor, ratio: float) -> torch.Tensor:
    """The coordinates a Neurotoxin attacker may change: those where benign training moves least.

    As the authors' ``grad_mask_cv`` with ``aggregate_all_layer 1`` (jhcknzzm/Federated-Learning-
    Backdoor ``FL_Backdoor_CV/helper.py``): over all layers at once, the ``int(D * ratio)``
    coordinates with the smallest ``|direction|`` (their ``torch.topk(-|g|, int(len * ratio))``).
    Ties go to the lower index (a stable sort), so the mask is the same on every device.

    Args:
        direction: ``(D,)`` the benign direction (a gradient or a global update).
        ratio: The fraction of coordinates kept, in ``(0, 1]`` (the authors' ``gradmask_ratio``).

    Returns:
        ``(D,)`` bool, ``True`` where the attacker's update is kept.
    """
    D = direction.numel()
    k = int(D * ratio)
    order = direction.reshape(-1).abs().argsort(stable=True)  # (D,) smallest magnitude first
    keep = torch.zeros(D, dtype=torch.bool, device=direction.device)
    keep[order[:k]] = True
    return keep


# ---- attack success ----------------------------------------------------------------------------
@torch.no_grad()
def attack_success(
    predict: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
    value: Union[float, torch.Tensor],
    target: int,
    source: Optional[int] = None,
    batch_size: int = 2000,
) -> dict[str, float]:
    """Attack success rate of a backdoor on a test set.

    Args:
        predict: Images ``(b, C, H, W)`` -> logits ``(b, classes)``.
        x: ``(n, C, H, W)`` clean test images.
        y: ``(n,)`` true labels.
        mask: ``(H, W)`` the full trigger (DBA: the union of the local triggers).
        value: Trigger value, scalar or ``(C,)``.
        target: Target label.
        source: One-to-one: the source class; ``None`` = all-to-one.
        batch_size: Images per forward pass.

    Returns:
        ``asr``: of the triggered images whose true class is not the target (one-to-one: the
        source-class images), the fraction classified as ``target`` (DBA's
        ``poison_test_dataset``, BackFed; ``nan`` if there are none). ``asr_all``: the fraction
        of all triggered test images classified as ``target``, true targets included (the
        authors' toolkit's "backdoor accuracy").
    """
    hits = torch.empty(len(y), dtype=torch.bool, device=y.device)
    for lo in range(0, len(y), batch_size):
        xt = apply_trigger(x[lo : lo + batch_size], mask, value)
        hits[lo : lo + batch_size] = predict(xt).argmax(dim=1) == target
    keep = (y == source) if source is not None else (y != target)
    n_keep = int(keep.sum())
    asr = float(hits[keep].sum()) / n_keep if n_keep else float("nan")
    return {"asr": asr, "asr_all": float(hits.float().mean()) if len(y) else float("nan")}


__all__ = [
    "CORNERS", "DBA_PARTS", "SCHEDULES", "TRIGGERS", "Schedule", "apply_trigger", "attack_success", "content_keys",
    "dba_parts", "hash_uniform", "mix32", "neurotoxin_keep", "parse_location", "parse_schedule", "plus_mask",
    "poison_batch", "poison_count", "poison_rows", "poison_rows_reference", "square_mask", "trigger_mask",
]
