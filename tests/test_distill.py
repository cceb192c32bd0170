import pytest
import torch

from obd.bptt import outer_grad_one
from obd.config import DistillConfig
from obd.distill import outer_grad_unrolled, outer_loss, train_inner
from obd.engine import fresh_policy, outer_gradients
from obd.policy import init_policy


def tiny_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    S = torch.randn(8, 5, generator=g, dtype=torch.float64)
    A = torch.rand(8, 2, generator=g, dtype=torch.float64) * 2 - 1
    p0 = [q.double() for q in init_policy(5, 2, (7, 6), g, init="corl")]
    p0[-2] = p0[-2] * 100  # a head large enough that the inner loop moves the outputs
    obs = torch.randn(30, 5, generator=g, dtype=torch.float64)
    target = torch.rand(30, 2, generator=g, dtype=torch.float64) * 2 - 1
    weight = torch.rand(30, generator=g, dtype=torch.float64)
    return S, A, p0, obs, target, weight


@pytest.mark.parametrize("fn", [outer_grad_unrolled, outer_grad_one])
def test_outer_gradient_matches_finite_differences(fn):
    S, A, p0, obs, target, weight = tiny_problem()
    steps, lr = 5, 0.5
    loss, gS, gA = fn(S, A, p0, obs, target, weight, steps, lr)
    assert gS.abs().max() > 1e-6 and gA.abs().max() > 1e-6

    def L(S_, A_):
        return outer_loss(train_inner(p0, S_, A_, steps, lr), obs, target, weight)

    assert float(L(S, A)) == pytest.approx(float(loss), rel=1e-12)
    eps = 1e-6
    for i, j in [(0, 0), (3, 4), (7, 2)]:
        E = torch.zeros_like(S)
        E[i, j] = eps
        fd = (L(S + E, A) - L(S - E, A)) / (2 * eps)
        assert float(gS[i, j]) == pytest.approx(float(fd), rel=1e-5, abs=1e-10)
    for i, j in [(1, 0), (6, 1)]:
        E = torch.zeros_like(A)
        E[i, j] = eps
        fd = (L(S, A + E) - L(S, A - E)) / (2 * eps)
        assert float(gA[i, j]) == pytest.approx(float(fd), rel=1e-5, abs=1e-10)


def test_hand_derived_bptt_equals_the_autograd_unroll_and_truncation_drops_early_steps():
    S, A, p0, obs, target, weight = tiny_problem(1)
    _, gS1, gA1 = outer_grad_unrolled(S, A, p0, obs, target, weight, 7, 0.3)
    _, gS2, gA2 = outer_grad_one(S, A, p0, obs, target, weight, 7, 0.3)
    torch.testing.assert_close(gS1, gS2, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(gA1, gA2, rtol=1e-10, atol=1e-14)
    _, gS3, _ = outer_grad_one(S, A, p0, obs, target, weight, 7, 0.3, truncate=7)
    torch.testing.assert_close(gS3, gS2)
    _, gS4, _ = outer_grad_one(S, A, p0, obs, target, weight, 7, 0.3, truncate=2)
    assert not torch.allclose(gS4, gS2)  # truncation drops the early steps' contributions


def test_float32_published_shapes_agree():
    g = torch.Generator().manual_seed(0)
    S, A = torch.randn(32, 17, generator=g), torch.rand(32, 6, generator=g) * 2 - 1
    p0 = init_policy(17, 6, (64, 64, 64), g, init="corl")  # float32 agrees tightly with the small head
    obs, target, w = torch.randn(128, 17, generator=g), torch.rand(128, 6, generator=g), torch.rand(128, generator=g)
    _, a1, b1 = outer_grad_unrolled(S, A, p0, obs, target, w, 20, 0.1)
    _, a2, b2 = outer_grad_one(S, A, p0, obs, target, w, 20, 0.1)
    torch.testing.assert_close(a1, a2, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(b1, b2, rtol=1e-4, atol=1e-7)


def test_init_is_orthogonal_and_seeded():
    g = torch.Generator().manual_seed(3)
    p = init_policy(17, 6, (256, 256, 256), g)
    W = p[2]  # 256 x 256 hidden layer, stored (in, out)
    torch.testing.assert_close(W.T @ W, 2 * torch.eye(256), atol=1e-4, rtol=0)
    # the official init: gain sqrt(2) on the head too (rows orthonormal times sqrt(2)); corl: 1e-2
    head = p[-2]  # (256, 6)
    torch.testing.assert_close(head.T @ head, 2 * torch.eye(6), atol=1e-4, rtol=0)
    assert all(float(b.abs().max()) == 0 for b in p[1::2])
    small = init_policy(17, 6, (256, 256, 256), torch.Generator().manual_seed(3), init="corl")[-2]
    torch.testing.assert_close(small.T @ small, 1e-4 * torch.eye(6), atol=1e-8, rtol=0)
    assert DistillConfig().init == "official"
    cfg = DistillConfig(seed=5, hidden=(8,))
    assert all(torch.equal(a, b) for a, b in zip(fresh_policy(cfg, 3, 2, 10), fresh_policy(cfg, 3, 2, 10)))
    assert not torch.equal(fresh_policy(cfg, 3, 2, 10)[0], fresh_policy(cfg, 3, 2, 11)[0])


def test_bf16_inner_products_stay_close_to_float32():
    """distill.inner_precision: bfloat16 runs the kernel's matrix products in bf16; the gradient returned
    is float32 and near the float32 one; runs of both precisions in one call get each its own."""
    g = torch.Generator().manual_seed(0)
    S, A = torch.randn(32, 5, generator=g), torch.rand(32, 2, generator=g) * 2 - 1
    obs, target, w = (
        torch.randn(64, 5, generator=g),
        torch.rand(64, 2, generator=g) * 2 - 1,
        torch.rand(64, generator=g),
    )
    grads, cfgs = {}, []
    for prec in ("float32", "bfloat16"):
        cfgs.append(DistillConfig(hidden=(32, 32), inner_steps=5, inner_precision=prec))
        _, gS, gA = outer_gradients(cfgs[-1:], S[None], A[None], obs[None], target[None], w[None], [0])
        assert gS.dtype == torch.float32 and gA.dtype == torch.float32
        grads[prec] = torch.cat([gS.flatten(), gA.flatten()])
    rel = float((grads["bfloat16"] - grads["float32"]).norm() / grads["float32"].norm())
    assert 0 < rel < 0.1
    two = lambda x: torch.stack([x, x])  # noqa: E731
    _, gS, gA = outer_gradients(cfgs, two(S), two(A), two(obs), two(target), two(w), [0, 0])
    for k, prec in enumerate(("float32", "bfloat16")):
        torch.testing.assert_close(torch.cat([gS[k].flatten(), gA[k].flatten()]), grads[prec], rtol=1e-5, atol=1e-7)
