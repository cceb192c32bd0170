import numpy as np
import pytest

from obd.data.tasks import UnknownTaskError, get_task, normalized_score, task_names


def test_registry_names_and_envs():
    assert len(task_names()) == 15
    t = get_task("hopper-medium-replay-v2")
    assert (t.env, t.kind, t.env_id, t.obs_dim, t.act_dim) == ("hopper", "medium-replay", "Hopper-v5", 11, 3)
    assert get_task("walker2d-expert").env_id == "Walker2d-v5"
    assert get_task("halfcheetah-medium-expert").name == "halfcheetah-medium-expert"


@pytest.mark.parametrize("bad", ["ant-medium", "hopper-mediocre", "hopper", "halfcheetah-medium-v3", ""])
def test_unknown_task_lists_valid(bad):
    with pytest.raises(UnknownTaskError) as e:
        get_task(bad)
    msg = str(e.value)
    assert repr(bad) in msg and "halfcheetah-medium-replay" in msg and "walker2d-random" in msg


def test_normalized_score_matches_d4rl():
    assert normalized_score("halfcheetah-medium", -280.178953) == pytest.approx(0.0)
    assert normalized_score("halfcheetah-medium", 12135.0) == pytest.approx(100.0)
    assert normalized_score("hopper-expert", 3234.3) == pytest.approx(100.0)
    assert normalized_score("walker2d-random", 1.629008) == pytest.approx(0.0)
    # 100 * (R - min) / (max - min), elementwise on arrays
    r = np.array([1000.0, 2000.0])
    np.testing.assert_allclose(normalized_score("hopper-medium", r), 100 * (r + 20.272305) / (3234.3 + 20.272305))
    assert normalized_score("walker2d-medium", 2296.0) == pytest.approx(100 * (2296.0 - 1.629008) / (4592.3 - 1.629008))
