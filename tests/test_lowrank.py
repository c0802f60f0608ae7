"""Activation-aware joint factorization and rank budgets (the numerical core of the MLA pass)."""

from __future__ import annotations

import pytest
import torch

from dscompile.errors import ConfigError
from dscompile.lowrank import allocate_ranks, joint_factorize, whitening


def _correlated_inputs(n: int = 4000, width: int = 16) -> torch.Tensor:
    torch.manual_seed(0)
    mix = torch.randn(width, width, dtype=torch.float64) * torch.logspace(0, -2, width, dtype=torch.float64)
    return torch.randn(n, width, dtype=torch.float64) @ mix.T


def _kv(width: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.randn(6, width, dtype=torch.float64), torch.randn(6, width, dtype=torch.float64)


def _output_error(w: torch.Tensor, w_r: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x @ (w - w_r).T) ** 2).sum(-1).mean())


def test_full_rank_reproduces_the_weights_exactly():
    k, v = _kv()
    x = _correlated_inputs()
    factors = joint_factorize([k, v], rank=12, covariance=x.T @ x / len(x))
    k_r, v_r = factors.reconstruct()
    torch.testing.assert_close(k_r, k, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(v_r, v, rtol=1e-8, atol=1e-8)
    assert factors.down.shape == (12, 16) and [u.shape for u in factors.ups] == [(6, 12), (6, 12)]


def test_whitened_fit_beats_plain_svd_on_outputs_and_its_spectrum_is_the_error():
    k, v = _kv()
    x = _correlated_inputs()
    cov = x.T @ x / len(x)
    stack = torch.cat([k, v])
    whitened = joint_factorize([k, v], rank=4, covariance=cov)
    plain = joint_factorize([k, v], rank=4)
    err_whitened = _output_error(stack, torch.cat(whitened.reconstruct()), x)
    err_plain = _output_error(stack, torch.cat(plain.reconstruct()), x)
    assert err_whitened < 0.8 * err_plain
    # The discarded squared singular values are the output error (up to the tiny damping).
    assert err_whitened == pytest.approx(float(whitened.spectrum[4:].sum()), rel=1e-3)
    # And the plain SVD is the better fit of the weights themselves.
    assert (stack - torch.cat(plain.reconstruct())).norm() < (stack - torch.cat(whitened.reconstruct())).norm()


def test_scales_trade_k_accuracy_for_v_accuracy():
    k, v = _kv()
    x = _correlated_inputs()
    cov = x.T @ x / len(x)
    even = joint_factorize([k, v], rank=5, covariance=cov).reconstruct()
    favour_v = joint_factorize([k, v], rank=5, covariance=cov, scales=(1.0, 4.0)).reconstruct()
    assert _output_error(v, favour_v[1], x) < _output_error(v, even[1], x)
    assert _output_error(k, favour_v[0], x) > _output_error(k, even[0], x)


def test_factors_keep_the_weight_dtype():
    k, v = (w.float() for w in _kv())
    factors = joint_factorize([k, v], rank=3)
    assert factors.down.dtype == torch.float32 and all(u.dtype == torch.float32 for u in factors.ups)


def test_whitening_inverts_and_survives_a_singular_covariance():
    x = _correlated_inputs()[:, :8]
    singular = torch.cat([x, x[:, :1]], dim=1)  # a repeated input column: covariance of rank 8 in 9 dimensions
    s, s_inv = whitening(singular.T @ singular / len(singular))
    torch.testing.assert_close(s @ s_inv, torch.eye(9, dtype=torch.float64), rtol=0, atol=1e-6)


def test_shrinkage_keeps_full_rank_exact_and_at_one_whitens_by_channel_scales_alone():
    k, v = _kv()
    x = _correlated_inputs()
    cov = x.T @ x / len(x)
    for shrinkage in (0.3, 1.0):
        k_r, v_r = joint_factorize([k, v], rank=12, covariance=cov, shrinkage=shrinkage).reconstruct()
        torch.testing.assert_close(torch.cat([k_r, v_r]), torch.cat([k, v]), rtol=1e-8, atol=1e-8)
    s, _ = whitening(cov, damping=0.0, shrinkage=1.0)
    torch.testing.assert_close(s, torch.diag(cov.diagonal().sqrt()), rtol=1e-12, atol=0)
    half, _ = whitening(cov, damping=0.0, shrinkage=0.5)
    torch.testing.assert_close(half @ half.T, 0.5 * cov + 0.5 * torch.diag(cov.diagonal()), rtol=1e-10, atol=1e-12)


def test_shrinkage_trades_calibration_fit_for_channel_balance():
    """Full whitening is the optimum on the calibration inputs; shrinking costs there, by an amount that grows."""
    k, v = _kv()
    x = _correlated_inputs()
    cov, stack = x.T @ x / len(x), torch.cat(_kv())
    errors = [_output_error(stack, torch.cat(joint_factorize([k, v], rank=4, covariance=cov,
                                                             shrinkage=a).reconstruct()), x) for a in (0.0, 0.2, 1.0)]
    assert errors[0] < errors[1] < errors[2]


@pytest.mark.parametrize("shrinkage", [-0.1, 1.5])
def test_shrinkage_outside_zero_one_is_refused(shrinkage):
    with pytest.raises(ConfigError, match="shrinkage must be in"):
        whitening(torch.eye(3), shrinkage=shrinkage)


@pytest.mark.parametrize("kwargs, message", [
    ({"rank": 0}, "rank 0 is outside"),
    ({"rank": 13}, "rank 13 is outside"),
    ({"rank": 2, "scales": (1.0,)}, "one positive number per weight"),
    ({"rank": 2, "scales": (1.0, 0.0)}, "one positive number per weight"),
    ({"rank": 2, "covariance": torch.eye(3)}, "covariance must be"),
])
def test_bad_factorization_requests_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        joint_factorize(list(_kv()), **kwargs)


def test_mismatched_weights_and_empty_input_are_refused():
    with pytest.raises(ConfigError, match="matrices"):
        joint_factorize([torch.randn(4, 8), torch.randn(4, 9)], rank=2)
    with pytest.raises(ConfigError, match="at least one"):
        joint_factorize([], rank=1)


def test_uniform_budget_is_even_capped_and_exact():
    spectra = [torch.ones(8), torch.ones(8), torch.ones(3)]
    ranks = allocate_ranks(spectra, 15)
    assert sum(ranks) == 15 and ranks[2] <= 3 and abs(ranks[0] - ranks[1]) <= 1
    assert allocate_ranks(spectra, 19) == [8, 8, 3]


def test_energy_budget_goes_where_energy_is_spread():
    peaked = torch.tensor([100.0, 1.0, 1.0, 1.0])
    flat = torch.tensor([1.0, 1.0, 1.0, 1.0])
    assert allocate_ranks([peaked, flat], 4, strategy="energy") == [1, 3]
    assert sum(allocate_ranks([peaked, flat, flat], 7, strategy="energy")) == 7


def test_impossible_budgets_and_unknown_strategies_are_refused():
    with pytest.raises(ConfigError, match="cannot be split"):
        allocate_ranks([torch.ones(4), torch.ones(4)], 9)
    with pytest.raises(ConfigError, match="cannot be split"):
        allocate_ranks([torch.ones(4), torch.ones(4)], 1)
    with pytest.raises(ConfigError, match="strategy"):
        allocate_ranks([torch.ones(4)], 2, strategy="greedy")
