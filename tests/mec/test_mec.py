"""Tests of the MEC coding lengths, losses and schedules against exact linear algebra."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from mecqtk.mec import (
    MECSchedule,
    MixtureCodingLength,
    coding_length,
    coding_length_unit,
    gamma_warmup,
    grouped_coding_length,
    grouped_mec_loss,
    lam_warmup_scale,
    log_det_identity_plus,
    mec_loss,
    taylor_radius_bound,
)
from mecqtk.mec.logdet import trace_of_powers

F64 = torch.float64


def features(m: int, d: int, seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(m, d, generator=generator, dtype=dtype)


def unit(z: torch.Tensor) -> torch.Tensor:
    return F.normalize(z, dim=-1)


def series_terms(z1: torch.Tensor, z2: torch.Tensor, lam: float, n: int) -> list[float]:
    """The terms (-1)^(k+1)/k tr((lam Z1 Z2^T)^k) from explicit matrix powers."""
    x = lam * unit(z1) @ unit(z2).T
    return [
        (-1) ** (k + 1) / k * torch.trace(torch.linalg.matrix_power(x, k)).item()
        for k in range(1, n + 1)
    ]


# --- the kernel -------------------------------------------------------------------------------


@pytest.mark.parametrize("order", [1, 2, 3, 4, 5, 7])
def test_trace_of_powers_matches_matrix_power(order):
    x = features(9, 9, seed=0) / 4  # not symmetric
    expected = [torch.trace(torch.linalg.matrix_power(x, k)) for k in range(1, order + 1)]
    torch.testing.assert_close(torch.stack(trace_of_powers(x, order)), torch.stack(expected))


@pytest.mark.parametrize("cross", [False, True])
def test_series_converges_to_exact_as_order_grows(cross):
    z1 = features(40, 12, seed=1)
    z2 = z1 + 0.3 * features(40, 12, seed=2) if cross else None
    eps2 = 24.0
    assert float(taylor_radius_bound(z1, z2, eps2=eps2)) < 0.7
    exact = coding_length(z1, z2, eps2=eps2, order=None).item()
    errors = [abs(coding_length(z1, z2, eps2=eps2, order=n).item() - exact) for n in range(1, 11)]
    assert all(later < earlier for earlier, later in itertools.pairwise(errors))
    assert errors[-1] < 1e-4 * abs(exact)


def test_series_error_is_bounded_by_the_next_term():
    # For a PSD Gram inside the region every eigenvalue's series alternates with shrinking
    # terms, so the error after n terms is at most the (n+1)-th term.
    z = features(30, 20, seed=3)
    eps2, m, d = 8.0, 30, 20
    lam, mu = d / (m * eps2), (m + d) / 2
    assert float(taylor_radius_bound(z, eps2=eps2)) < 1
    exact = coding_length(z, eps2=eps2, order=None).item()
    terms = series_terms(z, z, lam, 9)
    for n in range(1, 9):
        error = abs(coding_length(z, eps2=eps2, order=n).item() - exact)
        assert error <= mu * abs(terms[n]) * (1 + 1e-9)
        assert error >= 0.1 * mu * abs(terms[n])  # the bound is tight, the test is not vacuous


def test_taylor_value_equals_explicit_series():
    z1, z2 = features(16, 6, seed=4), features(16, 6, seed=5)
    lam = 6 / (16 * 3.0)
    explicit = (16 + 6) / 2 * sum(series_terms(z1, z2, lam, 4))
    assert coding_length(z1, z2, eps2=3.0, order=4).item() == pytest.approx(explicit, rel=1e-12)


@pytest.mark.parametrize(("m", "d"), [(12, 5), (5, 12)])
@pytest.mark.parametrize("order", [None, 1, 4, 6])
@pytest.mark.parametrize("cross", [False, True])
def test_samples_and_features_forms_agree(m, d, order, cross):
    a = unit(features(m, d, seed=6))
    b = unit(a + 0.2 * features(m, d, seed=7)) if cross else a
    lam = d / (m * 2.0 * d)
    samples = log_det_identity_plus(a, b, lam, order=order, form="samples")
    features_form = log_det_identity_plus(a, b, lam, order=order, form="features")
    automatic = log_det_identity_plus(a, b, lam, order=order)
    torch.testing.assert_close(samples, features_form, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(automatic, samples, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("m", "d"), [(12, 5), (5, 12)])
@pytest.mark.parametrize("order", [None, 4])
def test_row_weights_equal_symmetric_square_root_weighting(m, d, order):
    # det(I + lam W A B^T) = det(I + lam sqrt(W) A B^T sqrt(W)), in either form.
    a, b = unit(features(m, d, seed=48)), unit(features(m, d, seed=49))
    weights = torch.rand(3, m, dtype=F64, generator=torch.Generator().manual_seed(1))
    lam = torch.tensor([0.2, 0.3, 0.4], dtype=F64)
    root = weights.sqrt().unsqueeze(-1)
    expected = log_det_identity_plus(root * a, root * b, lam, order=order)
    for form in ("samples", "features"):
        got = log_det_identity_plus(a, b, lam, order=order, form=form, row_weights=weights)
        torch.testing.assert_close(got, expected)


def test_batched_kernel_matches_per_item_values():
    a = unit(features(24, 10, seed=8)).reshape(3, 8, 10)
    lam = torch.tensor([0.1, 0.2, 0.3], dtype=F64)
    batched = log_det_identity_plus(a, a, lam, order=None)
    single = [log_det_identity_plus(a[i], a[i], float(lam[i]), order=None) for i in range(3)]
    torch.testing.assert_close(batched, torch.stack(single))


@pytest.mark.parametrize("order", [None, 4])
@pytest.mark.parametrize(("m", "d"), [(6, 4), (4, 6)])
def test_gradients_match_finite_differences(order, m, d):
    z1 = features(m, d, seed=9).requires_grad_()
    z2 = features(m, d, seed=10).add(z1.detach()).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: coding_length(a, b, eps2=2.0, order=order), (z1, z2)
    )
    assert torch.autograd.gradcheck(lambda a: coding_length(a, eps2=2.0, order=order), (z1,))
    assert torch.autograd.gradcheck(
        lambda a, b: mec_loss(a, b, eps2=2.0, order=order, lam_scale=0.5), (z1, z2)
    )


def test_exact_form_is_nan_where_the_determinant_is_negative():
    z1 = torch.tensor([[1.0, 0.0]], dtype=F64)
    value = coding_length(z1, -z1, eps2=0.5, order=None)  # det = 1 - lam = 1 - 4 < 0
    assert math.isnan(value.item())
    assert math.isfinite(coding_length(z1, -z1, eps2=0.5, order=4).item())


# --- the plain coding length and loss ---------------------------------------------------------


@pytest.mark.parametrize("order", [None, 4])
def test_missing_second_view_means_the_first(order):
    z = features(20, 8, seed=11).requires_grad_()
    alone = coding_length(z, eps2=8.0, order=order)
    (grad_alone,) = torch.autograd.grad(alone, z)
    paired = coding_length(z, z, eps2=8.0, order=order)
    (grad_paired,) = torch.autograd.grad(paired, z)
    torch.testing.assert_close(alone, paired)
    torch.testing.assert_close(grad_alone, grad_paired)


@pytest.mark.parametrize("order", [None, 4])
def test_coding_length_ignores_row_norms(order):
    z1, z2 = features(20, 8, seed=12), features(20, 8, seed=13)
    scale = torch.rand(20, 1, dtype=F64, generator=torch.Generator().manual_seed(0)) * 50 + 0.01
    torch.testing.assert_close(
        coding_length(z1 * scale, z2 / scale, eps2=8.0, order=order),
        coding_length(z1, z2, eps2=8.0, order=order),
    )
    torch.testing.assert_close(
        grouped_coding_length(z1 * scale, eps2=8.0, groups=2, order=order),
        grouped_coding_length(z1, eps2=8.0, groups=2, order=order),
    )


def test_coding_length_matches_the_published_formula():
    z1, z2 = features(10, 30, seed=14), features(10, 30, seed=15)
    m, d, eps2 = 10, 30, 40.0
    lam, mu = d / (m * eps2), (m + d) / 2
    expected = mu * torch.logdet(torch.eye(m, dtype=F64) + lam * unit(z1) @ unit(z2).T)
    torch.testing.assert_close(coding_length(z1, z2, eps2=eps2, order=None), expected)


@pytest.mark.parametrize("lam_scale", [1.0, 0.3])
def test_first_order_loss_is_minus_the_mean_cosine(lam_scale):
    z1, z2 = features(32, 16, seed=16), features(32, 16, seed=17)
    loss = mec_loss(z1, z2, eps2=16.0, order=1, lam_scale=lam_scale)
    mean_cosine = F.cosine_similarity(z1, z2, dim=1).mean()
    torch.testing.assert_close(loss, -mean_cosine)


def test_second_order_loss_adds_the_cross_pair_penalty():
    z1, z2 = features(32, 16, seed=18), features(32, 16, seed=19)
    m, d, eps2, lam_scale = 32, 16, 16.0, 0.5
    lam = lam_scale * d / (m * eps2)
    cos = unit(z1) @ unit(z2).T  # cos[i, j] = cos(z1_i, z2_j)
    expected = -torch.diagonal(cos).mean() + lam / (2 * m) * (cos * cos.T).sum()
    torch.testing.assert_close(mec_loss(z1, z2, eps2=eps2, order=2, lam_scale=lam_scale), expected)


@pytest.mark.parametrize("order", [None, 4])
def test_loss_is_the_coding_length_in_its_unit(order):
    z1, z2 = features(24, 40, seed=20), features(24, 40, seed=21)
    eps2, lam_scale = 40.0, 0.25
    length = coding_length(z1, z2, eps2=eps2 / lam_scale, order=order)
    unit_ = coding_length_unit(24, 40, eps2 / lam_scale)
    torch.testing.assert_close(
        mec_loss(z1, z2, eps2=eps2, order=order, lam_scale=lam_scale), -length / unit_
    )


def test_collapsed_features_reach_the_radius_bound():
    z = torch.ones(16, 32)
    assert float(taylor_radius_bound(z, eps2=8.0)) == pytest.approx(32 / 8.0, rel=1e-5)
    assert float(taylor_radius_bound(z, eps2=32.0)) == pytest.approx(1.0, rel=1e-5)


def test_loss_is_about_minus_one_for_aligned_spread_features():
    teacher = features(128, 64, seed=22, dtype=torch.float32)
    student = teacher + 0.1 * features(128, 64, seed=23, dtype=torch.float32)
    loss = mec_loss(student, teacher, eps2=64.0).item()
    assert -1.0 < loss < -0.9


def test_half_precision_and_autocast_compute_in_float32():
    z = features(16, 8, seed=24, dtype=torch.float32)
    reference = coding_length(z, eps2=8.0)
    assert coding_length(z.to(torch.bfloat16), eps2=8.0).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = coding_length(z, eps2=8.0)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, reference)


# --- grouped form -----------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", ["global", "block"])
@pytest.mark.parametrize("order", [None, 4])
def test_one_group_equals_the_plain_form(normalize, order):
    z1, z2 = features(20, 12, seed=25, dtype=torch.float32), features(20, 12, seed=26)
    z2 = z2.float()
    grouped = grouped_coding_length(z1, z2, eps2=12.0, groups=1, order=order, normalize=normalize)
    torch.testing.assert_close(
        grouped, coding_length(z1, z2, eps2=12.0, order=order), rtol=1e-6, atol=0
    )
    torch.testing.assert_close(
        grouped_mec_loss(z1, z2, eps2=12.0, groups=1, order=order, normalize=normalize),
        mec_loss(z1, z2, eps2=12.0, order=order),
        rtol=1e-6,
        atol=0,
    )


@pytest.mark.parametrize(("m", "d", "groups"), [(20, 12, 2), (20, 10, 3), (6, 13, 4)])
def test_block_normalisation_sums_independent_coding_lengths(m, d, groups):
    z1, z2 = features(m, d, seed=27), features(m, d, seed=28)
    expected = sum(
        coding_length(b1, b2, eps2=5.0, order=None)
        for b1, b2 in zip(
            torch.tensor_split(z1, groups, 1), torch.tensor_split(z2, groups, 1), strict=True
        )
    )
    grouped = grouped_coding_length(z1, z2, eps2=5.0, groups=groups, order=None, normalize="block")
    torch.testing.assert_close(grouped, expected)


@pytest.mark.parametrize(("m", "d", "groups"), [(20, 12, 2), (20, 10, 3), (6, 13, 4)])
def test_global_normalisation_is_the_block_diagonal_log_det(m, d, groups):
    z = features(m, d, seed=29)
    lam = d / (m * 5.0)
    gram = unit(z).T @ unit(z)
    expected = sum(
        torch.logdet(torch.eye(len(block), dtype=F64) + lam * gram[block][:, block])
        for block in torch.tensor_split(torch.arange(d), groups)
    )
    grouped = grouped_coding_length(z, eps2=5.0, groups=groups, order=None)
    torch.testing.assert_close(grouped, (m + d) / 2 * expected)


@pytest.mark.parametrize("groups", [2, 3, 5])
def test_fischer_inequality_bounds_the_full_coding_length(groups):
    # Correlated channels, so the block-diagonal model loses information and the gap is real.
    z = features(40, 10, seed=30) @ features(10, 10, seed=31)
    full = coding_length(z, eps2=2.0, order=None)
    grouped = grouped_coding_length(z, eps2=2.0, groups=groups, order=None)
    assert grouped.item() > full.item() + 1e-3


def test_fischer_bound_is_tight_for_uncorrelated_blocks():
    z = torch.zeros(12, 6, dtype=F64)
    z[:6, :3] = features(6, 3, seed=32)
    z[6:, 3:] = features(6, 3, seed=33)  # the blocks live on disjoint samples: Z_1^T Z_2 = 0
    torch.testing.assert_close(
        grouped_coding_length(z, eps2=2.0, groups=2, order=None),
        coding_length(z, eps2=2.0, order=None),
    )


def test_grouped_first_order_loss_is_minus_the_mean_cosine():
    z1, z2 = features(32, 16, seed=34), features(32, 16, seed=35)
    loss = grouped_mec_loss(z1, z2, eps2=16.0, groups=4, order=1)
    torch.testing.assert_close(loss, -F.cosine_similarity(z1, z2, dim=1).mean())


# --- mixture form -----------------------------------------------------------------------------


@pytest.mark.parametrize("order", [None, 4])
@pytest.mark.parametrize("cross", [False, True])
def test_one_expert_equals_the_plain_form(order, cross):
    z1 = features(24, 10, seed=36, dtype=torch.float32).requires_grad_()
    z2 = features(24, 10, seed=37, dtype=torch.float32) if cross else None
    mixture = MixtureCodingLength(1, 10, eps2=10.0, order=order)
    value = mixture(z1, z2, lam_scale=0.5)
    plain = coding_length(z1, z2, eps2=20.0, order=order)
    torch.testing.assert_close(value, plain, rtol=1e-6, atol=0)
    (grad_mixture,) = torch.autograd.grad(value, z1)
    (grad_plain,) = torch.autograd.grad(plain, z1)
    torch.testing.assert_close(grad_mixture, grad_plain, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(
        mixture.loss(z1, z2), mec_loss(z1, z2, eps2=10.0, order=order), rtol=1e-6, atol=0
    )


def manual_mixture(z1, z2, p, eps2, order):
    """sum_k (m_k + d)/2 logdet(I + d/(m_k eps2) sqrt(P_k) Z1 Z2^T sqrt(P_k)), the docs' formula."""
    d = z1.shape[1]
    total = 0.0
    for k in range(p.shape[1]):
        root = p[:, k].sqrt().unsqueeze(1)
        mass = p[:, k].sum()
        lam = d / (mass * eps2)
        total = total + (mass + d) / 2 * log_det_identity_plus(
            root * unit(z1), root * unit(z2), lam, order=order
        )
    return total


@pytest.mark.parametrize("order", [None, 4])
def test_mixture_value_and_feature_gradient_follow_the_formula(order):
    torch.manual_seed(0)
    mixture = MixtureCodingLength(3, 8, eps2=8.0, order=order).double()
    z1 = features(30, 8, seed=38).requires_grad_()
    z2 = features(30, 8, seed=39).add(z1.detach()).requires_grad_()
    value = mixture(z1, z2)
    p = mixture.memberships(z1).detach()
    expected = manual_mixture(z1, z2, p, 8.0, order)
    torch.testing.assert_close(value, expected)
    grads = torch.autograd.grad(value, (z1, z2))
    expected_grads = torch.autograd.grad(expected, (z1, z2))
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_mixture_gate_descends_the_compression_rate():
    torch.manual_seed(1)
    mixture = MixtureCodingLength(3, 8, eps2=8.0, order=None).double()
    z = features(30, 8, seed=40)
    mixture(z).backward()
    gate_grads = [param.grad.clone() for param in mixture.gate.parameters()]
    mixture.zero_grad()
    rate = mixture.compression_rate(z)
    ((30 + 8) / 2 * rate).backward()
    for got, want in zip(gate_grads, [p.grad for p in mixture.gate.parameters()], strict=True):
        torch.testing.assert_close(got, -want)


@pytest.mark.parametrize("order", [None, 4])
def test_compression_rate_never_exceeds_the_whole_batch(order):
    # Concavity of log det (and of the even-order series) under a fixed trace.
    z = features(40, 12, seed=41)
    mixture = MixtureCodingLength(4, 12, eps2=12.0, order=order).double()
    whole = coding_length(z, eps2=12.0, order=order) / ((40 + 12) / 2)
    for seed in range(5):
        torch.manual_seed(seed)
        torch.nn.init.normal_(mixture.gate.weight, std=3.0)
        assert mixture.compression_rate(z).item() < whole.item() - 1e-4
    torch.nn.init.zeros_(mixture.gate.weight)
    torch.nn.init.zeros_(mixture.gate.bias)  # uniform memberships: every expert sees the batch
    torch.testing.assert_close(mixture.compression_rate(z), whole)


def clustered_features(clusters: int, tail: int, m: int = 128, d: int = 16):
    generator = torch.Generator().manual_seed(42)
    means = 2 * F.normalize(torch.randn(clusters + 1, d, generator=generator), dim=1)
    labels = torch.cat([torch.arange(m - tail) % clusters, torch.full((tail,), clusters)])
    return means[labels] + 0.4 * torch.randn(m, d, generator=generator), labels


@pytest.fixture
def one_thread():
    """Hundreds of tiny steps: intra-op threads only add contention on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(("clusters", "experts"), [(1, 2), (3, 4)])
def test_trained_gate_gives_every_cluster_and_the_tail_its_own_expert(clusters, experts):
    z, labels = clustered_features(clusters, tail=16)
    torch.manual_seed(1)
    mixture = MixtureCodingLength(experts, 16, eps2=16.0)
    optimizer = torch.optim.Adam(mixture.parameters(), lr=0.1)
    start = mixture.compression_rate(z).item()
    for _ in range(150):
        optimizer.zero_grad()
        mixture.loss(z).backward()
        optimizer.step()
    assert mixture.compression_rate(z).item() < start - 0.01
    assignment = mixture.memberships(z).argmax(1)
    majority = [torch.mode(assignment[labels == c]).values.item() for c in range(clusters + 1)]
    assert len(set(majority)) == clusters + 1  # the tail's expert is nobody else's
    purity = [(assignment[labels == c] == k).float().mean() for c, k in enumerate(majority)]
    assert min(purity) > 0.9


def test_mixture_in_eval_mode_gives_the_same_value_without_gate_gradient():
    mixture = MixtureCodingLength(3, 8, eps2=8.0)
    z = features(20, 8, seed=43, dtype=torch.float32).requires_grad_()
    training_value = mixture(z)
    mixture.eval()
    value = mixture(z)
    torch.testing.assert_close(value, training_value)
    value.backward()
    assert z.grad is not None
    assert all(param.grad is None for param in mixture.gate.parameters())


# --- schedules --------------------------------------------------------------------------------


def test_lam_warmup_moves_one_over_lam_linearly_from_eight():
    assert lam_warmup_scale(0, 100) == 0.125
    assert lam_warmup_scale(50, 100) == pytest.approx(1 / 4.5)
    assert lam_warmup_scale(100, 100) == 1.0
    assert lam_warmup_scale(10_000, 100) == 1.0
    assert lam_warmup_scale(0, 0) == 1.0
    inverse = [1 / lam_warmup_scale(step, 10) for step in range(11)]
    torch.testing.assert_close(
        torch.tensor(inverse, dtype=F64), torch.linspace(8, 1, 11, dtype=F64)
    )
    assert lam_warmup_scale(5, 10, start=0.5) == pytest.approx(1 / 1.5)


def test_gamma_warmup_is_linear_from_zero():
    assert [gamma_warmup(s, 4, 2.0) for s in range(6)] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0]
    assert gamma_warmup(0, 0, 2.0) == 2.0


def test_schedule_combines_both_curves():
    schedule = MECSchedule(gamma=0.4, gamma_warmup_steps=10, lam_warmup_steps=20)
    assert schedule.weight(0) == 0.0
    assert schedule.weight(5) == pytest.approx(0.2)
    assert schedule.lam_scale(0) == 0.125
    assert schedule.lam_scale(20) == 1.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gamma": -1.0}, "gamma"),
        ({"gamma": float("nan")}, "gamma"),
        ({"gamma": 1.0, "gamma_warmup_steps": -1}, "warmup_steps"),
        ({"gamma": 1.0, "lam_warmup_steps": 2.5}, "warmup_steps"),
        ({"gamma": 1.0, "lam_start": 0.0}, "start"),
        ({"gamma": 1.0, "lam_start": 2.0}, "start"),
    ],
)
def test_schedule_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MECSchedule(**kwargs)


# --- argument errors --------------------------------------------------------------------------


def test_bad_arguments_raise_value_errors():
    z = features(8, 4, seed=44)
    with pytest.raises(ValueError, match="same shape"):
        coding_length(z, features(8, 5, seed=45), eps2=1.0)
    with pytest.raises(ValueError, match="2-D"):
        coding_length(z.flatten(), eps2=1.0)
    with pytest.raises(ValueError, match="eps2"):
        coding_length(z, eps2=0.0)
    with pytest.raises(ValueError, match="order"):
        coding_length(z, eps2=1.0, order=0)
    with pytest.raises(ValueError, match="lam_scale"):
        mec_loss(z, eps2=1.0, lam_scale=0.0)
    with pytest.raises(ValueError, match="groups"):
        grouped_coding_length(z, eps2=1.0, groups=5)
    with pytest.raises(ValueError, match="normalize"):
        grouped_coding_length(z, eps2=1.0, groups=2, normalize="rows")
    with pytest.raises(ValueError, match="gate expects"):
        MixtureCodingLength(2, 5, eps2=1.0)(z)
    with pytest.raises(ValueError, match="experts"):
        MixtureCodingLength(0, 4, eps2=1.0)


# --- devices ----------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    z1, z2 = features(64, 32, seed=46, dtype=torch.float32), features(64, 32, seed=47)
    z2 = z2.float()
    mixture = MixtureCodingLength(3, 32, eps2=32.0)
    for order in (None, 4):
        cpu = coding_length(z1, z2, eps2=32.0, order=order)
        cuda = coding_length(z1.cuda(), z2.cuda(), eps2=32.0, order=order)
        torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-5, atol=1e-5)
    grouped = grouped_coding_length(z1, eps2=32.0, groups=3, normalize="block")
    grouped_cuda = grouped_coding_length(z1.cuda(), eps2=32.0, groups=3, normalize="block")
    torch.testing.assert_close(grouped_cuda.cpu(), grouped, rtol=1e-5, atol=1e-5)
    value = mixture(z1, z2)
    torch.testing.assert_close(
        mixture.cuda()(z1.cuda(), z2.cuda()).cpu(), value, rtol=1e-5, atol=1e-4
    )
