import numpy as np
import pytest
import torch

from obd.config import EvalConfig
from obd.data import get_task
from obd.distill import train_inner
from obd.evaluate import evaluate_synthetic, init_stacked, summarize_history, train_stacked
from obd.policy import policy_forward


def test_batched_training_equals_separate_trainings_in_float64():
    cfg = EvalConfig(hidden=(32, 32), inner_steps=20)
    g = torch.Generator().manual_seed(0)
    S = torch.randn(16, 11, generator=g, dtype=torch.float64)
    A = torch.rand(16, 3, generator=g, dtype=torch.float64) * 2 - 1
    p0 = [q.double() for q in init_stacked(4, 11, 3, cfg, seed=1)]
    batched = train_stacked(p0, S, A, cfg)
    for m in range(4):
        single = [q[m] if i % 2 == 0 else q[m, 0] for i, q in enumerate(p0)]
        alone = train_inner(single, S, A, cfg.inner_steps, cfg.inner_lr)
        for i, q in enumerate(alone):
            torch.testing.assert_close(batched[i][m] if i % 2 == 0 else batched[i][m, 0], q, rtol=1e-10, atol=1e-12)
    # N distinct policies (different inits), each trained
    out = policy_forward(batched, S.expand(4, -1, -1))
    assert not torch.allclose(out[0], out[1])
    assert torch.allclose(out[0], policy_forward([q[0] if i % 2 == 0 else q[0, 0] for i, q in enumerate(batched)], S))


def test_evaluation_protocol_shapes_and_last_k():
    task = get_task("hopper-random")
    S, A = torch.randn(8, 11), torch.rand(8, 3) * 2 - 1
    cfg = EvalConfig(policies=3, episodes=2, inner_steps=3, hidden=(16, 16))
    r = evaluate_synthetic(S, A, task, np.zeros(11), np.ones(11), cfg, seed=0)
    assert len(r["policy_scores"]) == 3 and np.array(r["episode_scores"]).shape == (3, 2)
    assert r["score"] == pytest.approx(np.mean(r["episode_scores"]), abs=1e-3)
    again = evaluate_synthetic(S, A, task, np.zeros(11), np.ones(11), cfg, seed=0)
    assert again == r  # seeded
    ens = evaluate_synthetic(
        S, A, task, np.zeros(11), np.ones(11), EvalConfig(**{**cfg.__dict__, "ensemble": True}), seed=0
    )
    assert np.array(ens["episode_scores"]).shape == (1, 2)
    hist = [{"step": s, "score": float(s)} for s in (1, 2, 3, 4, 5, 6)]
    assert summarize_history(hist, 5) == {
        "score": 4.0,
        "final_score": 6.0,
        "last_k": 5,
        "last_k_used": 5,
        "scored_steps": [2, 3, 4, 5, 6],
    }
    assert summarize_history(hist[:2], 5)["score"] == 1.5
    assert summarize_history(hist, 5, scored_from=5)["score"] == 5.5  # never an evaluation before the window
