"""The K-run BPTT kernel against the single-run reference and itself, on CPU and (where present) CUDA."""

import pytest
import torch

from obd.bptt import Workspace, outer_grad, outer_grad_one
from obd.distill import outer_grad_unrolled
from obd.policy import init_policy, stack_params, unstack_params


def problem(seed: int, n=8, d=5, a=2, hidden=(7, 6), B=30):
    g = torch.Generator().manual_seed(seed)
    S = torch.randn(n, d, generator=g, dtype=torch.float64)
    A = torch.rand(n, a, generator=g, dtype=torch.float64) * 2 - 1
    p0 = [q.double() for q in init_policy(d, a, hidden, g, init="corl")]
    p0[-2] = p0[-2] * 100
    obs = torch.randn(B, d, generator=g, dtype=torch.float64)
    target = torch.rand(B, a, generator=g, dtype=torch.float64) * 2 - 1
    weight = torch.rand(B, generator=g, dtype=torch.float64)
    return S, A, p0, obs, target, weight


def stacked(runs: list[tuple]) -> tuple:
    """(S, A, params0, obs, target, weight) of several ``problem`` runs, stacked along a run dimension."""
    return (
        torch.stack([r[0] for r in runs]),
        torch.stack([r[1] for r in runs]),
        stack_params([r[2] for r in runs]),
        *(torch.stack([r[i] for r in runs]) for i in (3, 4, 5)),
    )


@pytest.mark.parametrize("truncate", [None, (1, 3, 2)])
def test_k_runs_get_each_the_gradient_of_the_autograd_unroll_in_float64(truncate):
    """Runs with different seeds, weights, learning rates, inner-step counts (frozen after their own) and
    truncation windows get, in one call, exactly the gradient each gets alone; exact runs match the
    autograd unroll."""
    runs = [problem(s) for s in range(3)]
    steps, lrs = (2, 5, 3), (0.5, 0.3, 0.2)
    loss, gS, gA = outer_grad(*stacked(runs), steps, lrs, truncate)
    for k, (s, a, p, o, t, w) in enumerate(runs):
        tk = None if truncate is None else truncate[k]
        l1, gS1, gA1 = outer_grad_one(s, a, p, o, t, w, steps[k], lrs[k], tk)
        assert float(loss[k]) == pytest.approx(float(l1), rel=1e-12)
        torch.testing.assert_close(gS[k], gS1, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(gA[k], gA1, rtol=1e-10, atol=1e-13)
        if tk is None or tk >= steps[k]:
            _, gS2, gA2 = outer_grad_unrolled(s, a, p, o, t, w, steps[k], lrs[k])
            torch.testing.assert_close(gS[k], gS2, rtol=1e-10, atol=1e-13)
            torch.testing.assert_close(gA[k], gA2, rtol=1e-10, atol=1e-13)
        else:
            _, gS2, _ = outer_grad_unrolled(s, a, p, o, t, w, steps[k], lrs[k])
            assert not torch.allclose(gS[k], gS2)  # the early steps' contributions are dropped


@pytest.mark.parametrize("truncate", [None, (1, 3, 2)])
def test_products_in_a_lower_precision_than_the_tape_keep_its_accuracy(truncate):
    """The kernel with its products in float32 on a float64 tape (every factor converted through the
    products' cache, activations and errors stored in float32) is the float64 gradient to float32
    accuracy: no product reads a stale or wrong conversion."""
    runs = stacked([problem(s) for s in range(3)])
    steps, lrs = (2, 5, 3), (0.5, 0.3, 0.2)
    exact = outer_grad(*runs, steps, lrs, truncate)
    low = outer_grad(*runs, steps, lrs, truncate, Workspace(), products=torch.float32)
    for x, y in zip(low, exact):
        assert x.dtype == torch.float64
        assert 0 < float((x - y).norm() / y.norm()) < 1e-5


def test_bf16_products_are_as_accurate_as_autocast_and_run_by_run():
    """inner_precision bfloat16: the kernel's bf16 products give a float32 gradient no farther from the
    float64 one than the autograd unroll under torch.autocast (the bf16 reference); K runs in one call
    get each the gradient it gets alone."""
    g = torch.Generator().manual_seed(0)
    n, d, a, B = 64, 11, 3, 256
    runs = []
    for _ in range(2):
        p0 = init_policy(d, a, (64, 64), g)
        runs.append(
            (
                torch.randn(n, d, generator=g),
                torch.rand(n, a, generator=g) * 2 - 1,
                p0,
                torch.randn(B, d, generator=g),
                torch.rand(B, a, generator=g) * 2 - 1,
                torch.rand(B, generator=g),
            )
        )
    both = outer_grad(*stacked(runs), (20, 20), (0.1, 0.1), products=torch.bfloat16)
    for k, (s, a_, p, o, t, w) in enumerate(runs):
        exact = outer_grad_one(
            s.double(), a_.double(), [q.double() for q in p], o.double(), t.double(), w.double(), 20, 0.1
        )
        one = outer_grad(*stacked([runs[k]]), (20,), (0.1,), products=torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = outer_grad_unrolled(s, a_, p, o, t, w, 20, 0.1)
        for i in (1, 2):
            assert both[i].dtype == torch.float32
            torch.testing.assert_close(both[i][k], one[i][0], rtol=1e-5, atol=1e-7)
            err = float((both[i][k].double() - exact[i]).norm() / exact[i].norm())
            err_auto = float((auto[i].double() - exact[i]).norm() / exact[i].norm())
            assert 0 < err <= 1.5 * err_auto and err < 0.2


def test_a_dropped_run_changes_nothing_for_the_others_and_the_workspace_is_reused():
    runs = [problem(s) for s in range(3)]
    S, A, p0, obs, target, weight = stacked(runs)
    ws = Workspace()
    _, gS, _ = outer_grad(S, A, p0, obs, target, weight, (2, 5, 3), (0.5, 0.3, 0.2), workspace=ws)
    tape = ws.P[0]
    keep = [0, 2]
    _, gS2, _ = outer_grad(
        S[keep], A[keep], [q[keep] for q in p0], obs[keep], target[keep], weight[keep], (2, 3), (0.5, 0.2), workspace=ws
    )
    torch.testing.assert_close(gS2, gS[keep], rtol=1e-12, atol=1e-14)
    # the same shape again: the tape is not reallocated
    outer_grad(
        S[keep], A[keep], [q[keep] for q in p0], obs[keep], target[keep], weight[keep], (2, 3), (0.5, 0.2), workspace=ws
    )
    assert ws.P[0] is not tape and ws.P[0].shape[1] == 2
    kept = ws.P[0]
    outer_grad(
        S[keep], A[keep], [q[keep] for q in p0], obs[keep], target[keep], weight[keep], (2, 3), (0.1, 0.2), workspace=ws
    )
    assert ws.P[0] is kept


def test_stack_and_unstack_are_inverse():
    runs = [problem(s)[2] for s in range(3)]
    st = stack_params(runs)
    for k in range(3):
        assert all(torch.equal(a, b) for a, b in zip(unstack_params(st, k), runs[k]))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_k_runs_on_cuda_match_cpu_in_float64():
    args_cpu = stacked([problem(s) for s in range(2)])
    cpu = outer_grad(*args_cpu, (3, 4), (0.3, 0.2))
    to = lambda x: [q.cuda() for q in x] if isinstance(x, list) else x.cuda()  # noqa: E731
    gpu = outer_grad(*(to(x) for x in args_cpu), (3, 4), (0.3, 0.2))
    for c, g in zip(cpu, gpu):
        assert g.device.type == "cuda"
        torch.testing.assert_close(g.cpu(), c, rtol=1e-9, atol=1e-12)


def test_graph_signature_inputs_and_constants():
    """What a CUDA graph treats as inputs (tensors, copied in per call) and as constants (the rest)."""
    from obd.cuda_graphs import _flatten, _rebuild

    S, p = torch.zeros(3, 2), [torch.ones(2), torch.ones(4)]
    tensors, key = _flatten((S, p, 100, 0.1))
    assert [t.shape for t in tensors] == [S.shape, (2,), (4,)]
    assert _flatten((S + 1, [q * 2 for q in p], 100, 0.1))[1] == key  # new values: same graph
    assert _flatten((S, p, 99, 0.1))[1] != key  # a new loop count: a new graph
    assert _flatten((torch.zeros(4, 2), p, 100, 0.1))[1] != key  # a new shape: a new graph
    assert _flatten((S, p, (100, 99), 0.1))[1] != _flatten((S, p, (100, 100), 0.1))[1]  # per-run steps too
    new = [t + 5 for t in tensors]
    rebuilt = _rebuild((S, p, 100, 0.1), new)
    assert rebuilt[0] is new[0] and rebuilt[1][1] is new[2] and rebuilt[2:] == (100, 0.1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "dtype,products", [(torch.float64, None), (torch.float32, None), (torch.float32, torch.bfloat16)]
)
def test_cuda_graph_replay_equals_eager(dtype, products):
    """The outer iteration captured once and replayed gives what the eager call gives on the same device,
    for new inputs of the same shape, without recapturing (one run and K runs; bf16 products too)."""
    from obd.cuda_graphs import Graphed

    tol = {"rtol": 1e-12, "atol": 1e-14} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-7}
    cuda = lambda x: [q.cuda().to(dtype) for q in x] if isinstance(x, list) else x.cuda().to(dtype)  # noqa: E731
    for K, steps, lrs in ((1, (4,), (0.3,)), (3, (2, 5, 3), (0.5, 0.3, 0.2))):
        ws = Workspace()
        graphed = Graphed(outer_grad, keepalive=lambda ws=ws: ws)
        for seed in range(3):
            args = tuple(cuda(x) for x in stacked([problem(seed + 10 * k) for k in range(K)]))
            eager = outer_grad(*args, steps, lrs, workspace=Workspace(), products=products)
            replay = graphed(*args, steps, lrs, workspace=ws, products=products)
            for e, r in zip(eager, replay):
                torch.testing.assert_close(r, e, **tol)
        assert graphed.captures == 1
