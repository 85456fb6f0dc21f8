"""DnC, geometric median, centered clipping and SignGuard against their defining equations."""

import numpy as np
import pytest
import scipy.optimize
import torch

from spfl_vmap.aggregators import CC_STATE_KEY, centered_clipping, dnc, geomed, signguard
from spfl_vmap.aggregators.spectral import outlier_scores


def gen(seed):
    return torch.Generator().manual_seed(seed)


# --- DnC (Shejwalkar & Houmansadr, NDSS 2021, Algorithm 2) ---------------------------------


def test_outlier_scores_are_squared_projections_on_top_right_singular_vector():
    for shape in [(7, 30), (30, 7)]:  # both Gram branches (N <= b and N > b)
        X = torch.randn(*shape, generator=gen(1))
        C = X - X.mean(0)
        v1 = torch.linalg.svd(C.double(), full_matrices=False).Vh[0]  # (b,)
        expected = ((C.double() @ v1) ** 2).float()
        torch.testing.assert_close(outlier_scores(C), expected, atol=1e-4, rtol=1e-4)


def test_dnc_removes_outliers_planted_along_a_direction():
    n, d, f = 20, 60, 3
    U = torch.randn(n, d, generator=gen(2))
    direction = torch.randn(d, generator=gen(3))
    direction /= direction.norm()
    U[:f] += 8.0 * direction * d**0.5  # far along one direction, invisible per coordinate
    out, m = dnc(U, None, f=f, niters=5, b=30, generator=gen(4))
    assert m["flagged"] == [0, 1, 2]
    torch.testing.assert_close(out, U[f:].mean(0))


def test_dnc_with_f0_is_the_mean():
    U = torch.randn(6, 5, generator=gen(5))
    torch.testing.assert_close(dnc(U, None, f=0)[0], U.mean(0))


# --- Geometric median (Pillutla et al. 2022, RFA) --------------------------------------------


def test_geomed_minimises_weighted_distance_sum():
    X = torch.randn(9, 4, generator=gen(6)).double()
    w = torch.tensor([1.0, 2, 3, 1, 1, 2, 5, 1, 1], dtype=torch.float64)
    a = (w / w.sum()).numpy()
    obj = lambda v: float((a * np.linalg.norm(X.numpy() - v, axis=1)).sum())  # noqa: E731
    ref = scipy.optimize.minimize(obj, X.mean(0).numpy(), method="Nelder-Mead",
                                  options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20000})
    out, m = geomed(X.float(), w.float(), tol=1e-10, max_iter=1000)
    assert obj(out.double().numpy()) <= ref.fun + 1e-5
    np.testing.assert_allclose(out.numpy(), ref.x, atol=1e-3)


def test_geomed_is_a_weiszfeld_fixed_point():
    X = torch.randn(8, 3, generator=gen(7)).double()  # fp64 in, fp64 out: a tight fixed point
    # tol=0 iterates until the fp64 objective stops changing (the objective is flat at the
    # optimum, so a relative tolerance t only pins v to about sqrt(t)).
    v, _ = geomed(X, None, tol=0.0, max_iter=5000)
    beta = 1.0 / (X - v).norm(dim=1)  # uniform a_i
    torch.testing.assert_close((beta @ X) / beta.sum(), v, atol=1e-8, rtol=1e-8)


def test_geomed_1d_is_the_weighted_median():
    # On a line the geometric median is the weighted median: weights 1, 1, 5 on 0, 1, 10 put more
    # than half the mass (5/7) on 10.
    out, _ = geomed(torch.tensor([[0.0], [1.0], [10.0]]), torch.tensor([1.0, 1.0, 5.0]), max_iter=500, tol=1e-12)
    assert float(out) == pytest.approx(10.0, abs=1e-3)


# --- Centered clipping (Karimireddy et al. 2021) ---------------------------------------------


def test_centered_clipping_one_iteration_and_state_carry_over():
    U = torch.tensor([[3.0, 4.0], [0.0, 1.0], [-6.0, 8.0]])
    state: dict = {}
    tau = 2.0
    out, _ = centered_clipping(U, None, tau=tau, state=state)
    # v0 = 0: clip rows to norm 2 -> (1.2, 1.6), (0, 1), (-1.2, 1.6); mean = (0, 4.2/3)
    v1 = torch.tensor([0.0, 1.4])
    torch.testing.assert_close(out, v1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state[CC_STATE_KEY], v1, atol=1e-5, rtol=1e-5)
    # second round starts from v1: v2 = v1 + mean_i clip_tau(U_i - v1)
    out2, _ = centered_clipping(U, None, tau=tau, state=state)
    diff = U - v1
    clipped = diff * torch.clamp(tau / diff.norm(dim=1, keepdim=True), max=1.0)
    torch.testing.assert_close(out2, v1 + clipped.mean(0), atol=1e-5, rtol=1e-5)


def test_centered_clipping_large_tau_many_iterations_is_the_mean():
    # With no clipping active, v <- v + mean(U - v) = mean(U) after one step, and stays there.
    U = torch.randn(5, 3, generator=gen(8))
    out, _ = centered_clipping(U, None, tau=1e9, n_iter=3)
    torch.testing.assert_close(out, U.mean(0), atol=1e-5, rtol=1e-5)


# --- SignGuard (Xu et al. 2022) --------------------------------------------------------------


def test_signguard_filters_sign_flipped_and_huge_rows():
    n, d = 20, 2000
    U = 0.05 + 0.1 * torch.randn(n, d, generator=gen(9))  # benign: mostly positive coordinates
    U[:4] = -U[:4]  # sign flip: same norm, opposite sign statistics
    U[4] *= 50.0  # norm outlier (> 3x the median norm)
    out, m = signguard(U, None, generator=gen(10))
    assert set(m["flagged"]) >= {0, 1, 2, 3, 4}
    assert 4 in m["norm_flagged"] and {0, 1, 2, 3} <= set(m["sign_flagged"])
    sel = torch.tensor(m["selected"])
    norms = U.norm(dim=1)
    M = norms.quantile(0.5)
    expected = (U[sel] * torch.clamp(M / norms[sel], max=1.0)[:, None]).mean(0)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
