"""The registry front door: kwargs filtering and the non-finite-row policy."""

import pytest
import torch

from spfl_vmap.aggregators import AGGREGATORS, aggregate
from spfl_vmap.errors import ConfigError

ALL = AGGREGATORS.names()


def test_registry_names():
    assert ALL == sorted(["mean", "median", "trimmed_mean", "krum", "multi_krum", "bulyan", "dnc",
                          "geomed", "centered_clipping", "signguard", "norm_clip", "rlr", "foolsgold", "flame", "fltrust"])
    with pytest.raises(ConfigError, match="unknown aggregator"):
        aggregate("krumm", torch.zeros(3, 2))


@pytest.mark.parametrize("name", ALL)
def test_nan_and_inf_rows_never_reach_the_result(name):
    n, d, f = 15, 12, 3
    U = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
    U[0] = float("nan")
    U[1] = float("inf")
    U[2, 5] = float("-inf")  # one bad entry is enough
    out, m = aggregate(name, U, torch.ones(n), f=f, state={}, generator=torch.Generator().manual_seed(1), **engine_extra(name, d))
    assert out.shape == (d,) and bool(torch.isfinite(out).all())
    assert m["nonfinite_excluded"] == [0, 1, 2] and m["round_rejected"] is False
    assert all(i >= 3 for i in m.get("selected", []))  # indices refer to U's rows


def engine_extra(name: str, d: int) -> dict:
    """Engine keywords a rule cannot run without: FLTrust's server update."""
    return {"server_update": torch.randn(d, generator=torch.Generator().manual_seed(9))} if name == "fltrust" else {}


@pytest.mark.parametrize("name", ALL)
def test_all_rows_nonfinite_rejects_the_round(name):
    U = torch.full((5, 4), float("nan"))
    out, m = aggregate(name, U, None, f=1)
    assert m["round_rejected"] is True
    torch.testing.assert_close(out, torch.zeros(4))


@pytest.mark.parametrize("name", ALL)
def test_finite_rows_whose_squared_norm_overflows_are_excluded(name):
    # 1e30 is a finite float32, but 1e30**2 is not: distances and norms of this row are inf.
    U = torch.randn(15, 4, generator=torch.Generator().manual_seed(3))
    U[7] = 1e30
    out, m = aggregate(name, U, None, f=2, **engine_extra(name, 4))
    assert m["nonfinite_excluded"] == [7] and bool(torch.isfinite(out).all())


def test_a_non_finite_result_rejects_the_round(monkeypatch):
    def broken(U, weights):
        return torch.full((U.shape[1],), float("nan")), {}

    monkeypatch.setitem(AGGREGATORS._items, "broken", broken)
    out, m = aggregate("broken", torch.ones(3, 2), None, f=1)
    assert m["round_rejected"] is True
    torch.testing.assert_close(out, torch.zeros(2))


def test_indices_are_mapped_back_and_f_is_lowered():
    # Bulyan with n=7, f=1 is valid; excluding row 0 leaves n=6 < 4*1+3, but the excluded row
    # counts as a detected Byzantine client, so f becomes 0 and 6 >= 3 holds.
    U = torch.tensor([[float("nan")], [0.0], [1.0], [2.0], [3.0], [4.0], [100.0]])
    out, m = aggregate("bulyan", U, None, f=1)
    assert m["nonfinite_excluded"] == [0]
    assert sorted(m["selected"]) == [1, 2, 3, 4, 5, 6]
    torch.testing.assert_close(out, torch.tensor([110.0 / 6]))  # f=0 Bulyan is the mean
    _, mk = aggregate("krum", U, None, f=1)
    assert mk["scores"][0] is None and len(mk["scores"]) == 7
    assert mk["selected"][0] in range(1, 7)
