import pytest
import torch

from obd.batched import outer_grad_batched, outer_grad_runs
from obd.distill import outer_grad_fast
from obd.policy import init_policy, stack_params


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


def test_batched_runs_equal_separate_runs_in_float64():
    """Issue 11: K runs with different seeds, weights, learning rates and inner-step counts (masked up to
    the maximum) get, in one batched iteration, exactly the gradient each gets alone."""
    runs = [problem(s) for s in range(3)]
    steps, lrs = [2, 5, 3], [0.5, 0.3, 0.2]
    S, A, p0, obs, target, weight = stacked(runs)
    loss, gS, gA = outer_grad_batched(
        S, A, p0, obs, target, weight, torch.tensor(steps), torch.tensor(lrs, dtype=torch.float64)
    )
    for k, (s, a, p, o, t, w) in enumerate(runs):
        l1, gS1, gA1 = outer_grad_fast(s, a, p, o, t, w, steps[k], lrs[k])
        assert float(loss[k]) == pytest.approx(float(l1), rel=1e-12)
        torch.testing.assert_close(gS[k], gS1, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(gA[k], gA1, rtol=1e-10, atol=1e-13)
    # a run dropped from the batch (e.g. a pruned trial) changes nothing for the others
    keep = [0, 2]
    loss2, gS2, _ = outer_grad_batched(
        S[keep],
        A[keep],
        [q[keep] for q in p0],
        obs[keep],
        target[keep],
        weight[keep],
        torch.tensor([steps[i] for i in keep]),
        torch.tensor([lrs[i] for i in keep], dtype=torch.float64),
    )
    torch.testing.assert_close(gS2, gS[keep], rtol=1e-12, atol=1e-14)


def test_engines_agree_in_float64():
    """The per-run loop (CPU default) and the bmm engine (CUDA default) give the same K gradients."""
    runs = [problem(s) for s in range(3)]
    args = (*stacked(runs), torch.tensor([2, 5, 3]), torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))
    for a, b in zip(outer_grad_runs(*args, engine="loop"), outer_grad_runs(*args, engine="bmm")):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    with pytest.raises(ValueError, match="unknown engine"):
        outer_grad_runs(*args, engine="fast")


def test_device_choice_and_a_clean_error_without_cuda():
    from obd.devices import resolve_device
    from obd.errors import ObdError

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ObdError, match="--device cuda: no CUDA device is available"):
            resolve_device("cuda")


def test_cuda_unavailable_is_one_line_from_the_cli(tmp_path):
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "obd.train",
            "--task",
            "hopper-random",
            "--budget",
            "smoke",
            "--device",
            "cuda",
            "--out",
            str(tmp_path / "r"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert r.returncode == 2 and "no CUDA device is available" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batched_on_cuda_matches_cpu_in_float64():
    runs = [problem(s) for s in range(2)]
    args_cpu = stacked(runs)
    steps, lr = torch.tensor([3, 4]), torch.tensor([0.3, 0.2], dtype=torch.float64)
    cpu = outer_grad_batched(*args_cpu, steps, lr)
    to = lambda x: [q.cuda() for q in x] if isinstance(x, list) else x.cuda()  # noqa: E731
    gpu = outer_grad_batched(*(to(x) for x in args_cpu), steps, lr)
    for c, g in zip(cpu, gpu):
        assert g.device.type == "cuda"
        torch.testing.assert_close(g.cpu(), c, rtol=1e-9, atol=1e-12)


def tiny_cfgs(tmp_path, **over):
    from obd.config import RunConfig, merge

    base = {
        "outer_steps": 4,
        "eval_every": 2,
        "checkpoint_every": 2,
        "wandb": False,
        "threads": 1,
        "data": {"source": "hopper-random", "size": 2000},
        "teacher": {"td3bc": {"steps": 50, "hidden": [16, 16]}, "eval_episodes": 0},
        "density": {"k": 5},
        "distill": {
            "n_synthetic": 8,
            "inner_steps": 3,
            "hidden": [16, 16],
            "test_batches": 1,
            "batch_size": 32,
            "outer_optimizer": "adam",
            "outer_lr": 0.05,
        },
        "eval": {"policies": 2, "episodes": 1, "inner_steps": 3, "hidden": [16, 16]},
    }
    specs = [("sdw", 0, 0.1, 3), ("avpbc", 1, 0.2, 2)]
    return [
        merge(
            merge(RunConfig(), base),
            {
                "out": str(tmp_path / f"{m}-{s}"),
                **over,
                "distill": {"method": m, "seed": s, "inner_lr": lr, "inner_steps": t},
            },
        )
        for m, s, lr, t in specs
    ]


@pytest.mark.slow
def test_batched_runs_equal_separate_runs_and_resume(tmp_path):
    """Issue 11: K runs (different methods, seeds, inner lr and steps) in one batch give each run's own
    final set (float64), and a batched run resumes from its per-run checkpoints."""
    import numpy as np

    from obd.batched import run_batched

    together = run_batched(tiny_cfgs(tmp_path / "together"), show_progress=False, dtype=torch.float64, engine="bmm")
    alone = [
        run_batched([c], show_progress=False, dtype=torch.float64, engine="loop")[0]
        for c in tiny_cfgs(tmp_path / "alone")
    ]
    for t, a in zip(together, alone):
        assert [h["step"] for h in t["history"]] == [2, 4]
        assert t["score"] == pytest.approx(a["score"], abs=1e-6)
    for name in ("sdw-0", "avpbc-1"):
        zt, za = (
            np.load(tmp_path / "together" / name / "synthetic.npz"),
            np.load(tmp_path / "alone" / name / "synthetic.npz"),
        )
        np.testing.assert_allclose(zt["states"], za["states"], rtol=1e-6, atol=1e-7)
    # interrupted after 2 steps, then resumed to 4: the same result as straight through
    run_batched(tiny_cfgs(tmp_path / "resumed", outer_steps=2), show_progress=False, dtype=torch.float64)
    resumed = run_batched(tiny_cfgs(tmp_path / "resumed"), show_progress=False, dtype=torch.float64)
    assert [h["step"] for h in resumed[0]["history"]] == [2, 4]
    zr, zt = (
        np.load(tmp_path / "resumed" / "sdw-0" / "synthetic.npz"),
        np.load(tmp_path / "together" / "sdw-0" / "synthetic.npz"),
    )
    np.testing.assert_allclose(zr["states"], zt["states"], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_a_run_stopped_by_its_listener_is_dropped_and_each_run_has_its_own_wandb_run(tmp_path):
    """Issue 11: pruning by dropping a run from the batch leaves the others as they would be alone;
    every batched run logs to its own (offline) W&B run."""
    import json

    from obd.batched import advance_batched, run_batched

    class Pruned(Exception):
        pass

    def prune_at_2(step: int, value: float) -> None:
        if step == 2:
            raise Pruned(f"pruned at {step}")

    seen: list[tuple[int, float]] = []
    cfgs = tiny_cfgs(tmp_path / "batch", wandb=True)
    res = advance_batched(
        cfgs, [[prune_at_2], [lambda s, v: seen.append((s, v))]], show_progress=False, dtype=torch.float64, engine="bmm"
    )
    assert isinstance(res[0], Pruned) and isinstance(res[1], dict)
    assert [s for s, _ in seen] == [2, 4] and res[1]["history"][-1]["step"] == 4
    assert not (tmp_path / "batch" / "sdw-0" / "metrics.json").exists()
    assert (tmp_path / "batch" / "sdw-0" / "checkpoints" / "batched.pt").is_file()  # kept, resumable
    alone = run_batched([tiny_cfgs(tmp_path / "alone")[1]], show_progress=False, dtype=torch.float64)[0]
    assert res[1]["score"] == pytest.approx(alone["score"], abs=1e-6)
    ids = [(tmp_path / "batch" / n / "wandb-run-id").read_text() for n in ("sdw-0", "avpbc-1")]
    assert len(set(ids)) == 2
    for n, i in zip(("sdw-0", "avpbc-1"), ids):
        assert list((tmp_path / "batch" / n / "wandb").glob(f"offline-run-*-{i}"))
    assert json.loads((tmp_path / "batch" / "avpbc-1" / "metrics.json").read_text())["engine"] == "batched"


def test_graph_signature_inputs_and_constants():
    """What a CUDA graph treats as inputs (tensors, copied in per call) and as constants (the rest)."""
    from obd.cuda_graphs import _flatten, _rebuild

    S, p = torch.zeros(3, 2), [torch.ones(2), torch.ones(4)]
    tensors, key = _flatten((S, p, 100, 0.1))
    assert [t.shape for t in tensors] == [S.shape, (2,), (4,)]
    assert _flatten((S + 1, [q * 2 for q in p], 100, 0.1))[1] == key  # new values: same graph
    assert _flatten((S, p, 99, 0.1))[1] != key  # a new loop count: a new graph
    assert _flatten((torch.zeros(4, 2), p, 100, 0.1))[1] != key  # a new shape: a new graph
    new = [t + 5 for t in tensors]
    rebuilt = _rebuild((S, p, 100, 0.1), new)
    assert rebuilt[0] is new[0] and rebuilt[1][1] is new[2] and rebuilt[2:] == (100, 0.1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_graph_replay_equals_eager(dtype):
    """Issue 11: the outer iteration captured once and replayed gives what the eager call gives on the
    same device, for new inputs of the same shape, without recapturing (single run and K runs)."""
    from obd.cuda_graphs import Graphed
    from obd.distill import _Tape

    tol = {"rtol": 1e-12, "atol": 1e-14} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-7}
    cuda = lambda x: [q.cuda().to(dtype) for q in x] if isinstance(x, list) else x.cuda().to(dtype)  # noqa: E731
    graphed = Graphed(outer_grad_fast, keepalive=lambda: _Tape._cached)
    for seed in range(3):
        S, A, p0, obs, target, weight = (cuda(x) for x in problem(seed))
        eager = outer_grad_fast(S, A, p0, obs, target, weight, 4, 0.3)
        replay = graphed(S, A, p0, obs, target, weight, 4, 0.3)
        for e, r in zip(eager, replay):
            torch.testing.assert_close(r, e, **tol)
    assert graphed.captures == 1
    runs = [problem(s) for s in range(3)]
    args = (
        *(cuda(x) for x in stacked(runs)),
        torch.tensor([2, 5, 3]),
        torch.tensor([0.5, 0.3, 0.2], dtype=dtype),
    )
    batched = Graphed(outer_grad_batched)
    eager = outer_grad_runs(*args, engine="bmm")
    for _ in range(2):
        replay = outer_grad_runs(*args, engine="bmm", graphed=batched)
        for e, r in zip(eager, replay):
            torch.testing.assert_close(r, e, **tol)
    assert batched.captures == 1
