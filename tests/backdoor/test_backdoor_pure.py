"""Backdoor pure layer: trigger masks, stamping, DBA parts, poisoned slots, hashing, ASR."""

from __future__ import annotations

import math

import pytest
import torch

from spfl_vmap.attacks import apply_trigger, dba_parts, poison_rows, trigger_mask
from spfl_vmap.attacks.backdoor import (
    attack_success,
    content_keys,
    hash_uniform,
    parse_location,
    plus_mask,
    poison_batch,
    poison_rows_reference,
    square_mask,
)
from spfl_vmap.errors import ConfigError




def pixels(mask: torch.Tensor) -> set[tuple[int, int]]:
    return {(int(r), int(c)) for r, c in mask.nonzero()}


def test_toolkit_plus_is_the_reference_indices():
    m = trigger_mask("plus", 28, 28)
    assert sorted(m.reshape(-1).nonzero().squeeze(1).tolist()) == sorted([57, 58, 59, 30, 86])


def test_rlr_plus_rows_5_to_9_col_5_and_cols_3_to_7_row_7():
    expected = {(r, 5) for r in range(5, 10)} | {(7, c) for c in range(3, 8)}
    assert pixels(trigger_mask("rlr_plus", 28, 28)) == expected


@pytest.mark.parametrize("loc,corner", [("top_left", (0, 0)), ("top_right", (0, 25)), ("bottom_left", (25, 0)),
                                        ("bottom_right", (25, 25)), ("4,6", (4, 6)), ((4, 6), (4, 6))])
def test_square_locations(loc, corner):
    m = square_mask(28, 28, 3, loc)
    r0, c0 = corner
    assert pixels(m) == {(r0 + i, c0 + j) for i in range(3) for j in range(3)}


def test_square_margin_and_center():
    assert pixels(square_mask(10, 10, 2, "bottom_right", margin=1)) == {(7, 7), (7, 8), (8, 7), (8, 8)}
    assert pixels(square_mask(5, 5, 1, "center")) == {(2, 2)}


@pytest.mark.parametrize("call", [lambda: square_mask(8, 8, 9), lambda: square_mask(8, 8, 3, (6, 6)),
                                  lambda: plus_mask(4, 4, (3, 3)), lambda: trigger_mask("star", 8, 8),
                                  lambda: parse_location("middle"), lambda: dba_parts(square_mask(8, 8, 1))])
def test_bad_triggers_are_config_errors(call):
    with pytest.raises(ConfigError):
        call()


def test_apply_trigger_over_leading_dims_and_channels():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 3, 6, 6, generator=g)  # (n, B, C, H, W)
    mask = square_mask(6, 6, 2, "top_left")
    value = torch.tensor([1.0, 2.0, 3.0])
    out = apply_trigger(x, mask, value)
    ref = x.clone()
    for c in range(3):
        for r, cc in pixels(mask):
            ref[..., c, r, cc] = value[c]
    assert torch.equal(out, ref)
    assert torch.equal(apply_trigger(x, mask, 9.0)[..., 0, 0], torch.full((2, 3, 3), 9.0))


def test_dba_parts_partition_the_trigger():
    for mask in (square_mask(28, 28, 3), square_mask(28, 28, 4), trigger_mask("plus", 28, 28), trigger_mask("rlr_plus", 28, 28)):
        parts = dba_parts(mask, 4)
        assert parts.shape == (4, 28, 28)
        assert torch.equal(parts.any(0), mask)
        assert int(parts.sum()) == int(mask.sum())  # disjoint
        assert all(int(p.sum()) >= 1 for p in parts)
    rows = dba_parts(square_mask(8, 8, 4, "top_left"), 4)  # a 4x4 square: its 4 rows (the paper's 1x4 strips)
    for i in range(4):
        assert pixels(rows[i]) == {(i, c) for c in range(4)}


def test_poison_rows_equals_per_client_reference():
    g = torch.Generator().manual_seed(3)
    n, B = 7, 13
    malicious = torch.tensor([1, 0, 1, 1, 0, 1, 1], dtype=torch.bool)
    scores = torch.rand(n, B, generator=g)
    scores[0, 3] = scores[0, 5]  # a tie: the lower slot wins
    eligible = torch.rand(n, B, generator=g) < 0.5
    for frac in (0.0, 0.3, 0.5, 1.0):
        for elig in (None, eligible):
            got = poison_rows(malicious, B, frac, eligible=elig, scores=scores)
            assert torch.equal(got, poison_rows_reference(malicious, B, frac, scores, elig))
            m = torch.full((n,), B) if elig is None else elig.sum(1)
            expected = torch.tensor([math.floor(frac * int(k) + 1e-9) if bool(mal) else 0 for k, mal in zip(m, malicious)])
            assert torch.equal(got.sum(1), expected)
            if elig is not None:
                assert not bool((got & ~elig).any())


def test_poison_rows_from_generator_is_seeded():
    mal = torch.ones(4, dtype=torch.bool)
    a = poison_rows(mal, 10, 0.5, generator=torch.Generator().manual_seed(5))
    b = poison_rows(mal, 10, 0.5, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and torch.equal(a.sum(1), torch.full((4,), 5))
    u = torch.rand(4, 10, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, poison_rows_reference(mal, 10, 0.5, u))


def test_poison_batch_touches_only_poisoned_slots():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(3, 4, 1, 5, 5, generator=g), torch.randint(0, 10, (3, 4), generator=g)
    poisoned = torch.tensor([[1, 0, 0, 1], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    mask = square_mask(5, 5, 2)
    x2, y2 = poison_batch(x, y, poisoned, mask, 7.5, target=7)
    for i in range(3):
        for j in range(4):
            if poisoned[i, j]:
                assert torch.equal(x2[i, j], apply_trigger(x[i, j], mask, 7.5)) and int(y2[i, j]) == 7
            else:
                assert torch.equal(x2[i, j], x[i, j]) and int(y2[i, j]) == int(y[i, j])


def test_hash_and_content_keys_do_not_depend_on_slicing():
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(6, 5, 1, 8, 8, generator=g), torch.randint(0, 10, (6, 5), generator=g)
    keys = content_keys(x, y)
    assert keys.shape == (6, 5) and len(set(keys.reshape(-1).tolist())) == 30  # distinct samples, distinct keys
    for i in range(6):
        assert torch.equal(content_keys(x[i : i + 1], y[i : i + 1]), keys[i : i + 1])
        assert torch.equal(content_keys(x[i, 2], y[i, 2]), keys[i, 2])
    ids = torch.arange(6)[:, None]
    u = hash_uniform(123, ids, keys, torch.arange(5)[None])
    assert u.shape == (6, 5) and bool(((u >= 0) & (u < 1)).all())
    assert torch.equal(hash_uniform(123, ids[2:4], keys[2:4], torch.arange(5)[None]), u[2:4])
    assert not torch.equal(hash_uniform(124, ids, keys, torch.arange(5)[None]), u)
    # roughly uniform: the mean of 20k hashes of consecutive integers
    v = hash_uniform(7, torch.arange(20000))
    assert abs(float(v.mean()) - 0.5) < 0.01


def test_attack_success_equals_a_loop_reference():
    g = torch.Generator().manual_seed(6)
    lin = torch.nn.Linear(16, 4)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(4, 16, generator=g))
        lin.bias.copy_(torch.randn(4, generator=g))
    x, y = torch.randn(50, 1, 4, 4, generator=g), torch.randint(0, 4, (50,), generator=g)
    mask = square_mask(4, 4, 2)

    def predict(xb):
        return lin(xb.reshape(len(xb), -1))

    for source in (None, 1):
        got = attack_success(predict, x, y, mask, 3.0, target=2, source=source, batch_size=7)
        hit_keep = keep = hit_all = 0
        for i in range(50):
            xi = x[i].clone()
            for r, c in pixels(mask):
                xi[0, r, c] = 3.0
            hit = int(predict(xi[None]).argmax(1)) == 2
            hit_all += hit
            if (int(y[i]) == source) if source is not None else (int(y[i]) != 2):
                keep += 1
                hit_keep += hit
        assert got["asr"] == pytest.approx(hit_keep / keep)
        assert got["asr_all"] == pytest.approx(hit_all / 50)
