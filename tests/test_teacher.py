import subprocess
import sys
import textwrap

import pytest
import torch

from obd.config import TD3BCConfig
from obd.errors import ObdError
from obd.teacher import load_corl_checkpoint, load_teacher, load_teacher_file, train_td3bc

CORL_SCRIPT = textwrap.dedent("""
    import sys, torch
    from torch import nn

    class Scalar(nn.Module):  # as in CORL's cal_ql.py, defined in __main__
        def __init__(self, v):
            super().__init__()
            self.constant = nn.Parameter(torch.tensor(v))

    class TanhGaussianPolicy(nn.Module):
        def __init__(self, s, a):
            super().__init__()
            self.base_network = nn.Sequential(nn.Linear(s, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                              nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 2 * a))
            self.log_std_multiplier = Scalar(1.0)
            self.log_std_offset = Scalar(-1.0)

    class FullyConnectedQFunction(nn.Module):
        def __init__(self, s, a):
            super().__init__()
            self.network = nn.Sequential(nn.Linear(s + a, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                         nn.Linear(256, 1))

    class Payload:  # what a malicious checkpoint could carry: it must never run
        def __reduce__(self):
            return (open, (sys.argv[2], "w"))

    torch.manual_seed(0)
    actor, q1, q2 = TanhGaussianPolicy(11, 3), FullyConnectedQFunction(11, 3), FullyConnectedQFunction(11, 3)
    opt = torch.optim.Adam(actor.parameters())
    actor.base_network(torch.zeros(2, 11)).sum().backward()
    opt.step()
    torch.save({"actor": actor.state_dict(), "critic1": q1.state_dict(), "critic2": q2.state_dict(),
                "actor_optim": opt.state_dict(), "sac_log_alpha": Scalar(0.0), "payload": Payload(),
                "total_it": 1234}, sys.argv[1])
    x = torch.linspace(-1, 1, 22).reshape(2, 11)
    a = torch.tanh(actor.base_network(x)[:, :3])
    torch.save({"x": x, "a": a, "q": q1.network(torch.cat([x, a], 1)).squeeze(-1)}, sys.argv[1] + ".expected")
""")


def test_corl_checkpoint_loads_without_running_foreign_code(tmp_path):
    script, ck, marker = tmp_path / "cal_ql.py", tmp_path / "checkpoint.pt", tmp_path / "pwned"
    script.write_text(CORL_SCRIPT)
    subprocess.run([sys.executable, str(script), str(ck), str(marker)], check=True)
    teacher = load_corl_checkpoint(ck, obs_dim=11, act_dim=3)
    assert not marker.exists()
    exp = torch.load(str(ck) + ".expected", weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(teacher.actor(exp["x"]), exp["a"])
        torch.testing.assert_close(teacher.critic(exp["x"], exp["a"]), exp["q"])
    assert teacher.info["total_it"] == 1234
    with pytest.raises(ObdError, match="obs/act dims 11/3, the task has 17/6"):
        load_corl_checkpoint(ck, obs_dim=17, act_dim=6)
    bad = tmp_path / "bad.pt"
    torch.save({"policy": {}}, bad)
    with pytest.raises(ObdError, match="not a CORL checkpoint of CQL/Cal-QL"):
        load_corl_checkpoint(bad, 11, 3)
    bad.write_bytes(b"garbage")
    with pytest.raises(ObdError, match="bad.pt: cannot read as a CORL checkpoint"):
        load_corl_checkpoint(bad, 11, 3)


def test_td3bc_learns_to_imitate_and_round_trips(tmp_path):
    g = torch.Generator().manual_seed(0)
    obs = torch.randn(2000, 4, generator=g)
    act = torch.tanh(obs[:, :2] * 1.5)  # a deterministic behaviour policy
    rew = obs[:, 0]  # action-independent reward: the BC term decides
    next_obs = torch.randn(2000, 4, generator=g)
    cfg = TD3BCConfig(steps=1500, hidden=(64, 64), batch_size=128)
    t = train_td3bc(obs, act, rew, next_obs, torch.zeros(2000), cfg, show_progress=False)
    with torch.no_grad():
        err = ((t.actor(obs) - act) ** 2).mean()
    assert err < 0.15 * ((act - act.mean(0)) ** 2).mean()  # far better than predicting the mean action
    t.save(tmp_path / "t.pt")
    t2 = load_teacher_file(tmp_path / "t.pt")
    a1, q1 = t.actions_and_values(obs)
    a2, q2 = t2.actions_and_values(obs)
    torch.testing.assert_close(a1, a2)
    torch.testing.assert_close(q1, q2)
    # obd's own teacher file is accepted wherever a teacher path is (it used to need a CORL 'critic1')
    t4 = load_teacher(tmp_path / "t.pt", obs_dim=4, act_dim=2)
    torch.testing.assert_close(t4.actions_and_values(obs)[0], a1)
    with pytest.raises(ObdError, match="obs\\+act dimension 6, the task has 5\\+2"):
        load_teacher(tmp_path / "t.pt", obs_dim=5, act_dim=2)
    # with a reward that prefers a = 0.5, the Q term moves the policy there from the data's actions
    t3 = train_td3bc(obs, act, -((act - 0.5) ** 2).sum(1), next_obs, torch.zeros(2000), cfg, show_progress=False)
    with torch.no_grad():
        assert ((t3.actor(obs) - 0.5) ** 2).mean() < 0.5 * ((act - 0.5) ** 2).mean()


def test_td3bc_resumes_from_its_checkpoint_exactly(tmp_path):
    """Teacher training checkpoints as it goes and at its end; continued from a shorter run's final
    state it equals the uninterrupted longer run."""
    g = torch.Generator().manual_seed(1)
    obs, act = torch.randn(500, 4, generator=g), torch.rand(500, 2, generator=g) * 2 - 1
    rew, nxt = torch.randn(500, generator=g), torch.randn(500, 4, generator=g)
    cfg = TD3BCConfig(steps=60, hidden=(16, 16), batch_size=32)
    straight = train_td3bc(obs, act, rew, nxt, torch.zeros(500), cfg, show_progress=False)
    ck = tmp_path / "partial.pt"
    # a first, shorter run: checkpointed at step 30 and at its end
    train_td3bc(
        obs,
        act,
        rew,
        nxt,
        torch.zeros(500),
        TD3BCConfig(steps=31, hidden=(16, 16), batch_size=32),
        show_progress=False,
        checkpoint=ck,
        checkpoint_every=30,
    )
    assert torch.load(ck, weights_only=True)["it"] == 31
    resumed = train_td3bc(
        obs, act, rew, nxt, torch.zeros(500), cfg, show_progress=False, checkpoint=ck, checkpoint_every=30
    )
    with torch.no_grad():
        torch.testing.assert_close(resumed.actor(obs), straight.actor(obs))


@pytest.mark.parametrize("fmt", ["td3bc", "iql-gaussian", "iql-deterministic"])
def test_corl_td3bc_and_iql_layouts_map_explicitly(tmp_path, fmt):
    """CORL TD3+BC and IQL checkpoints load: their actor and critic keys map explicitly."""
    from torch import nn

    torch.manual_seed(0)
    obs_dim, act_dim = 11, 3
    drop = fmt == "iql-deterministic"  # CORL's DeterministicPolicy MLP may carry dropout layers
    layers = [
        nn.Linear(obs_dim, 32),
        nn.ReLU(),
        *([nn.Dropout(0.1)] if drop else []),
        nn.Linear(32, 32),
        nn.ReLU(),
        *([nn.Dropout(0.1)] if drop else []),
        nn.Linear(32, act_dim),
        nn.Tanh(),
    ]
    pi = nn.Sequential(*layers).eval()
    q = nn.Sequential(nn.Linear(obs_dim + act_dim, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
    if fmt == "td3bc":
        ck = {
            "actor": {f"net.{k}": v for k, v in pi.state_dict().items()},
            "critic_1": {f"net.{k}": v for k, v in q.state_dict().items()},
            "total_it": 7,
        }
    else:
        actor = {f"net.net.{k}": v for k, v in pi.state_dict().items()}
        if fmt == "iql-gaussian":
            actor["log_std"] = torch.zeros(act_dim)
        ck = {"actor": actor, "qf": {f"q1.net.{k}": v for k, v in q.state_dict().items()}, "vf": {}, "total_it": 7}
    path = tmp_path / "ck.pt"
    torch.save(ck, path)
    t = load_teacher(path, obs_dim, act_dim)
    x = torch.randn(64, obs_dim)
    with torch.no_grad():
        a = pi(x)
        torch.testing.assert_close(t.actor(x), a)
        torch.testing.assert_close(t.critic(x, a), q(torch.cat([x, a], 1)).squeeze(-1))
    assert t.info["kind"] == f"corl-{fmt.split('-')[0]}" and t.info["total_it"] == 7


def test_a_corrupt_training_state_is_one_line_naming_the_file(tmp_path):
    from obd.errors import ObdError

    g = torch.Generator().manual_seed(1)
    obs, act = torch.randn(50, 4, generator=g), torch.rand(50, 2, generator=g) * 2 - 1
    ck = tmp_path / "teacher-x.partial.pt"
    ck.write_bytes(b"not a torch file")
    with pytest.raises(ObdError, match=r"teacher-x.partial.pt: not a readable TD3\+BC training state.*delete it"):
        train_td3bc(obs, act, torch.zeros(50), obs, torch.zeros(50), TD3BCConfig(steps=5, hidden=(8, 8)),
                    show_progress=False, checkpoint=ck)  # fmt: skip
