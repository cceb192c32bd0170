import numpy as np
import torch

from obd.rollout import evaluate_episodes


def test_rollouts_run_policy_on_one_thread_and_restore():
    seen = []

    def policy(obs: np.ndarray) -> np.ndarray:
        seen.append(torch.get_num_threads())
        return np.zeros((obs.shape[0], 3), np.float32)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rets = evaluate_episodes("Hopper-v5", policy, n_episodes=2, seed=0)
        assert rets.shape == (2,) and seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
