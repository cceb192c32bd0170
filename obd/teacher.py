"""Teacher pi*(s) and critic Q(s, a) from offline RL, used by PBC and Av-PBC/SDW.

Default: TD3+BC (Fujimoto & Gu, 2021; CORL's defaults) on normalized states, fast on CPU.
Also loads CORL-format checkpoints (Cal-QL, as the published OBD teachers): a dict whose
``actor`` is a tanh-Gaussian policy (``base_network`` of three 256-unit hidden layers and a
``2 * act_dim`` head) and whose ``critic1`` is a Q-network (``network``: two 256-unit hidden layers
on concat(normalized state, action)). Such files also pickle optimizer states and small modules
defined in the training script's ``__main__``; :func:`load_corl_checkpoint` reads them with an
unpickler that builds inert placeholders for every class outside torch's tensor machinery, so no
foreign code runs.
"""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
import time
import types
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from obd.config import TD3BCConfig
from obd.errors import ObdError
from obd.nets import EnsembleCritic, EnsembleLinear, TanhGaussianActor, mlp
from obd.seeding import derive_seed


class DeterministicActor(nn.Module):
    """a = tanh(MLP(s)): TD3+BC's actor. (B, obs_dim) -> (B, act_dim)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...]):
        super().__init__()
        self.net = mlp(obs_dim, act_dim, hidden)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(obs))


class TanhMeanActor(nn.Module):
    """Deterministic action tanh(mu(s)) of a tanh-Gaussian policy (CORL's ``act`` in eval mode)."""

    def __init__(self, actor: TanhGaussianActor):
        super().__init__()
        self.actor = actor

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.actor.deterministic(obs)


class QNetwork(nn.Module):
    """Q(s, a) = MLP(concat(s, a)); (B, obs_dim), (B, act_dim) -> (B,)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...] = (256, 256)):
        super().__init__()
        self.net = mlp(obs_dim + act_dim, 1, hidden)

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([obs, act], -1)).squeeze(-1)


@dataclass
class Teacher:
    """pi*: normalized state -> action in [-1, 1]; Q: (normalized state, action) -> value."""

    actor: nn.Module
    critic: nn.Module
    info: dict

    @torch.no_grad()
    def actions_and_values(self, obs_norm: torch.Tensor, batch: int = 65_536) -> tuple[torch.Tensor, torch.Tensor]:
        """pi*(s) (N, act_dim) and Q(s, pi*(s)) (N,) for all states, in chunks."""
        acts, qs = [], []
        for chunk in obs_norm.split(batch):
            a = self.actor(chunk)
            acts.append(a)
            qs.append(self.critic(chunk, a))
        return torch.cat(acts), torch.cat(qs)

    def save(self, path: Path) -> None:
        """A teacher file any ``--teacher`` accepts (tensors and strings only: loads with weights_only)."""
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        state = {
            "actor": self.actor.state_dict(),
            "critic": self.critic.state_dict(),
            "info": json.dumps(self.info),
            "kind": self.info["kind"],
        }
        torch.save(state, tmp)
        tmp.replace(path)


def train_td3bc(
    obs: torch.Tensor,
    act: torch.Tensor,
    rew: torch.Tensor,
    next_obs: torch.Tensor,
    terminals: torch.Tensor,
    cfg: TD3BCConfig,
    show_progress: bool = True,
    checkpoint: Path | None = None,
    checkpoint_every: int = 5_000,
    device: torch.device | None = None,
) -> Teacher:
    """TD3+BC on normalized states. obs/next_obs (N, obs_dim), act (N, act_dim), rew/terminals (N,).

    With ``checkpoint``, the full training state is written there every ``checkpoint_every`` steps and
    at the end (atomically), and training resumes from it: from an interrupted run's, or from a shorter
    run's final state (at a constant learning rate its steps are this run's first steps)."""
    torch.manual_seed(derive_seed(cfg.seed, "td3bc-init"))
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "td3bc-batches"))  # on the CPU: same on every device
    dev = device or torch.device("cpu")
    obs, act, rew, next_obs, terminals = (x.to(dev) for x in (obs, act, rew, next_obs, terminals))
    obs_dim, act_dim = obs.shape[1], act.shape[1]
    actor = DeterministicActor(obs_dim, act_dim, cfg.hidden).to(dev)
    actor_t = copy.deepcopy(actor).requires_grad_(False)
    critic = EnsembleCritic(obs_dim, act_dim, cfg.hidden, n=2).to(dev)
    critic_t = copy.deepcopy(critic).requires_grad_(False)
    a_opt = torch.optim.Adam(actor.parameters(), lr=cfg.actor_lr, fused=True)
    c_opt = torch.optim.Adam(critic.parameters(), lr=cfg.critic_lr, fused=True)
    not_done = 1.0 - terminals.float()
    params_c: list[torch.Tensor] = list(critic.parameters())
    params_ct: list[torch.Tensor] = list(critic_t.parameters())
    params_a: list[torch.Tensor] = list(actor.parameters())
    params_at: list[torch.Tensor] = list(actor_t.parameters())
    modules: dict[str, Any] = {
        "actor": actor,
        "actor_t": actor_t,
        "critic": critic,
        "critic_t": critic_t,
        "a_opt": a_opt,
        "c_opt": c_opt,
    }
    start, seconds_before = 0, 0.0
    if checkpoint is not None and checkpoint.is_file():
        try:
            state = torch.load(checkpoint, weights_only=True, map_location=dev)
            for k, m in modules.items():
                m.load_state_dict(state[k])
            gen.set_state(state["gen"].cpu())
            torch.set_rng_state(state["torch_rng"].cpu())
            start, seconds_before = int(state["it"]), float(state["seconds"])
        except (RuntimeError, KeyError, EOFError, pickle.UnpicklingError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ObdError(
                f"{checkpoint}: not a readable TD3+BC training state of this config ({first}); delete it to "
                "train the teacher from the start"
            ) from None
    t0 = time.time() - seconds_before
    bar = tqdm(
        range(start, cfg.steps),
        desc="teacher TD3+BC",
        disable=not show_progress,
        unit="step",
        smoothing=0.05,
        initial=start,
        total=cfg.steps,
    )

    def save_state(it: int) -> None:
        assert checkpoint is not None
        state = {k: m.state_dict() for k, m in modules.items()}
        state.update(gen=gen.get_state(), torch_rng=torch.get_rng_state(), it=it, seconds=time.time() - t0)
        tmp = checkpoint.with_name(f"{checkpoint.name}.{os.getpid()}.tmp")
        torch.save(state, tmp)
        tmp.replace(checkpoint)

    for it in bar:
        if checkpoint is not None and it > start and it % checkpoint_every == 0:
            save_state(it)
        idx = torch.randint(0, obs.shape[0], (cfg.batch_size,), generator=gen).to(dev)
        o, a, r, o2, nd = obs[idx], act[idx], rew[idx], next_obs[idx], not_done[idx]
        with torch.no_grad():
            noise = (torch.randn(a.shape, generator=gen) * cfg.policy_noise).clamp(-cfg.noise_clip, cfg.noise_clip)
            noise = noise.to(dev)
            a2 = (actor_t(o2) + noise).clamp(-1.0, 1.0)
            target = r + cfg.gamma * nd * critic_t(o2, a2).min(0).values
        c_loss = ((critic(o, a) - target) ** 2).mean(1).sum()
        c_opt.zero_grad(set_to_none=True)
        c_loss.backward()
        c_opt.step()
        if it % cfg.policy_freq == 0:
            critic.requires_grad_(False)
            pi = actor(o)
            q = critic(o, pi)[0]
            lmbda = cfg.alpha / q.abs().mean().detach()
            a_loss = -lmbda * q.mean() + ((pi - a) ** 2).mean()
            a_opt.zero_grad(set_to_none=True)
            a_loss.backward()
            a_opt.step()
            critic.requires_grad_(True)
            with torch.no_grad():
                torch._foreach_lerp_(params_ct, params_c, cfg.tau)
                torch._foreach_lerp_(params_at, params_a, cfg.tau)
    if checkpoint is not None and start < cfg.steps:
        save_state(cfg.steps)  # the final state: a longer run of this config continues from it
    q1 = QNetwork(obs_dim, act_dim, cfg.hidden)
    _ensemble_member_into(critic, 0, q1)
    info = {"kind": "td3bc", "config": asdict(cfg), "train_seconds": round(time.time() - t0, 1)}
    return Teacher(actor.cpu().eval(), q1.eval(), info)  # the teacher file and outputs live on the CPU


def _ensemble_member_into(ens: EnsembleCritic, i: int, q: QNetwork) -> None:
    lins = [m for m in q.net if isinstance(m, nn.Linear)]
    elins = [m for m in ens.net if isinstance(m, EnsembleLinear)]
    with torch.no_grad():
        for lin, el in zip(lins, elins):
            lin.weight.copy_(el.weight[i].T)
            lin.bias.copy_(el.bias[i, 0])


def load_teacher_file(path: Path) -> Teacher:
    """A teacher saved by :meth:`Teacher.save`."""
    d = torch.load(path, weights_only=True)
    info = json.loads(d["info"])
    actor_sd, critic_sd = d["actor"], d["critic"]
    obs_dim = critic_sd["net.0.weight"].shape[1] - _act_dim_of(actor_sd, info["kind"])
    act_dim = _act_dim_of(actor_sd, info["kind"])
    hidden = tuple(w.shape[0] for k, w in critic_sd.items() if k.endswith("weight"))[:-1]
    critic = QNetwork(obs_dim, act_dim, hidden)
    critic.load_state_dict(critic_sd)
    a_hidden = tuple(w.shape[0] for k, w in actor_sd.items() if k.endswith("weight"))[:-1]
    if info["kind"] not in GAUSSIAN_KINDS:
        actor: nn.Module = DeterministicActor(obs_dim, act_dim, a_hidden)
    else:
        actor = TanhMeanActor(TanhGaussianActor(obs_dim, act_dim, a_hidden))
    actor.load_state_dict(actor_sd)
    return Teacher(actor.eval(), critic.eval(), info)


def _act_dim_of(actor_sd: dict, kind: str) -> int:
    out = [w for k, w in actor_sd.items() if k.endswith("weight")][-1].shape[0]
    return out // 2 if kind in GAUSSIAN_KINDS else out


# ---------------------------------------------------------------- CORL checkpoints, read safely

_ALLOWED = {
    ("collections", "OrderedDict"),
    ("copyreg", "_reconstructor"),
    ("_codecs", "encode"),
    ("torch", "Size"),
    ("torch", "device"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    *{
        ("builtins", n)
        for n in (
            "dict",
            "list",
            "tuple",
            "set",
            "frozenset",
            "int",
            "float",
            "bool",
            "str",
            "bytes",
            "bytearray",
            "complex",
            "slice",
            "object",
        )
    },
}


class _Inert:
    """Stands in for any class of the training script: accepts construction and state, runs nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.__dict__["_state"] = state


class _SafeUnpickler(pickle.Unpickler):
    """Tensors, storages, containers and dtypes are rebuilt; every other global becomes an inert class."""

    def find_class(self, module: str, name: str):
        if (
            (module, name) in _ALLOWED
            or (module == "torch._utils" and name.startswith("_rebuild"))
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        ):
            return super().find_class(module, name)
        return type(name, (_Inert,), {"__module__": module})


_safe_pickle = types.SimpleNamespace(
    Unpickler=_SafeUnpickler, load=lambda f, **kw: _SafeUnpickler(f, **kw).load(), __name__="obd_safe_pickle"
)


def _linear_stack(sd: dict, prefix: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (weight, bias) pairs of the nn.Linear layers under ``prefix`` of a Sequential's state dict, in
    layer order (activations, dropout and squeeze layers hold no parameters and are skipped)."""
    idx = sorted(
        {
            int(k[len(prefix) :].split(".")[0])
            for k in sd
            if k.startswith(prefix) and k.endswith(".weight") and k[len(prefix) :].split(".")[0].isdigit()
        }
    )
    return [(sd[f"{prefix}{i}.weight"], sd[f"{prefix}{i}.bias"]) for i in idx]


def _mlp_from(stack: list[tuple[torch.Tensor, torch.Tensor]]) -> nn.Sequential:
    net = mlp(stack[0][0].shape[1], stack[-1][0].shape[0], tuple(w.shape[0] for w, _ in stack[:-1]))
    with torch.no_grad():
        for lin, (w, b) in zip((m for m in net if isinstance(m, nn.Linear)), stack):
            lin.weight.copy_(w)
            lin.bias.copy_(b)
    return net


# CORL's checkpoint layouts (algorithms/offline/*.py), each mapped explicitly:
#   CQL / Cal-QL: actor.base_network.* (a 2*act_dim tanh-Gaussian head), critic1.network.*
#   TD3+BC:       actor.net.* (Linear-ReLU-...-Linear-Tanh; max_action 1 on MuJoCo), critic_1.net.*
#   IQL:          actor.net.net.* (Gaussian mean with Tanh, or deterministic; dropout layers skipped), qf.q1.net.*
CORL_FORMATS = ("cql", "td3bc", "iql")
GAUSSIAN_KINDS = ("corl", "corl-cql")  # teacher kinds whose actor is a tanh-Gaussian (2 * act_dim head)


def _corl_format(ck: dict) -> str | None:
    if "critic1" in ck and "actor" in ck:
        return "cql"
    if "critic_1" in ck and "actor" in ck:
        return "td3bc"
    if "qf" in ck and "actor" in ck:
        return "iql"
    return None


def load_corl_checkpoint(path: str | Path, obs_dim: int, act_dim: int) -> Teacher:
    """pi* and Q1 from a CORL checkpoint of CQL/Cal-QL, TD3+BC or IQL; nothing else is built, no pickled
    code runs."""
    path = Path(path)
    if not path.is_file():
        raise ObdError(f"{path}: no such teacher checkpoint")
    raw = path.read_bytes()
    try:
        ck = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=False, pickle_module=_safe_pickle)
    except Exception as e:  # corrupt zip, refused global, truncated file
        raise ObdError(f"{path}: cannot read as a CORL checkpoint ({e})") from None
    fmt = _corl_format(ck) if isinstance(ck, dict) else None
    if fmt is None:
        keys = list(ck)[:10] if isinstance(ck, dict) else type(ck).__name__
        raise ObdError(
            f"{path}: not a CORL checkpoint of CQL/Cal-QL ('actor' + 'critic1'), TD3+BC ('actor' + "
            f"'critic_1') or IQL ('actor' + 'qf'); found {keys}"
        )
    a_prefix, c_key, c_prefix = {
        "cql": ("base_network.", "critic1", "network."),
        "td3bc": ("net.", "critic_1", "net."),
        "iql": ("net.net.", "qf", "q1.net."),
    }[fmt]
    a_stack, c_stack = _linear_stack(ck["actor"], a_prefix), _linear_stack(ck[c_key], c_prefix)
    if not a_stack or not c_stack:
        raise ObdError(f"{path}: {fmt} layout expected actor.{a_prefix}* and {c_key}.{c_prefix}* weights")
    head = 2 * act_dim if fmt == "cql" else act_dim
    if (
        a_stack[0][0].shape[1] != obs_dim
        or a_stack[-1][0].shape[0] != head
        or c_stack[0][0].shape[1] != obs_dim + act_dim
    ):
        raise ObdError(
            f"{path}: networks are for obs/act dims {a_stack[0][0].shape[1]}/"
            f"{c_stack[0][0].shape[1] - a_stack[0][0].shape[1]}, the task has {obs_dim}/{act_dim}"
        )
    critic = QNetwork(obs_dim, act_dim, tuple(w.shape[0] for w, _ in c_stack[:-1]))
    critic.net = _mlp_from(c_stack)
    actor: nn.Module
    if fmt == "cql":
        gauss = TanhGaussianActor(obs_dim, act_dim, tuple(w.shape[0] for w, _ in a_stack[:-1]))
        gauss.net = _mlp_from(a_stack)
        actor = TanhMeanActor(gauss)
    else:  # tanh on the last layer's output: the deterministic action (TD3+BC, IQL's mean or deterministic policy)
        actor = DeterministicActor(obs_dim, act_dim, tuple(w.shape[0] for w, _ in a_stack[:-1]))
        actor.net = _mlp_from(a_stack)
    info = {"kind": f"corl-{fmt}", "path": str(path), "total_it": int(ck["total_it"]) if "total_it" in ck else None}
    return Teacher(actor.eval(), critic.eval(), info)


def teacher_numpy_policy(teacher: Teacher, mean: np.ndarray, std: np.ndarray):
    """pi* on raw env observations (normalizes them first), for rollouts."""
    m, s = torch.as_tensor(mean), torch.as_tensor(std)

    @torch.no_grad()
    def policy(obs: np.ndarray) -> np.ndarray:
        return teacher.actor((torch.as_tensor(obs) - m) / s).numpy()

    return policy


def load_teacher(path: str | Path, obs_dim: int, act_dim: int) -> Teacher:
    """A teacher file: obd's own (written by :meth:`Teacher.save`) or a CORL checkpoint (read safely)."""
    path = Path(path)
    if not path.is_file():
        raise ObdError(f"{path}: no such teacher file")
    try:
        d = torch.load(path, weights_only=True, map_location="cpu")
    except Exception:  # CORL files pickle optimizer objects and __main__ classes: the safe reader handles them
        d = None
    if isinstance(d, dict) and {"actor", "critic", "info", "kind"} <= set(d):
        teacher = load_teacher_file(path)
        dims = next(iter(teacher.critic.parameters())).shape[1]
        if dims != obs_dim + act_dim:
            raise ObdError(
                f"{path}: the teacher's networks take obs+act dimension {dims}, the task has {obs_dim}+{act_dim}"
            )
        return teacher
    return load_corl_checkpoint(path, obs_dim, act_dim)
