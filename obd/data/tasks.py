"""Task registry: D4RL MuJoCo dataset names, their gymnasium envs and D4RL reference returns."""

from __future__ import annotations

from dataclasses import dataclass

from obd.errors import ObdError

ENVS: dict[str, str] = {"halfcheetah": "HalfCheetah-v5", "hopper": "Hopper-v5", "walker2d": "Walker2d-v5"}
KINDS: tuple[str, ...] = ("random", "medium", "medium-replay", "medium-expert", "expert")

# D4RL's REF_MIN_SCORE / REF_MAX_SCORE (d4rl/infos.py), identical across dataset kinds.
REF_RETURNS: dict[str, tuple[float, float]] = {
    "halfcheetah": (-280.178953, 12135.0),
    "hopper": (-20.272305, 3234.3),
    "walker2d": (1.629008, 4592.3),
}
OBS_DIMS: dict[str, int] = {"halfcheetah": 17, "hopper": 11, "walker2d": 17}
ACT_DIMS: dict[str, int] = {"halfcheetah": 6, "hopper": 3, "walker2d": 6}
# Mean normalized return of D4RL's own behaviour data, the target our generated data aims at.
D4RL_BEHAVIOUR_SCORE: dict[str, dict[str, float]] = {
    "halfcheetah": {"medium": 40.7, "expert": 88.1},
    "hopper": {"medium": 44.3, "expert": 108.5},
    "walker2d": {"medium": 62.1, "expert": 107.2},
}
# Minari's MuJoCo datasets (collected on the v5 envs) that correspond to a D4RL kind; Minari has no
# random, medium-replay or medium-expert counterpart, so those have no mapping.
MINARI_IDS: dict[str, str] = {
    f"{env}-{kind}": f"mujoco/{env}/{kind}-v0" for env in ENVS for kind in ("medium", "expert")
}


class UnknownTaskError(ObdError, ValueError):
    """Raised for a task name outside the registry; the message lists the valid names."""


@dataclass(frozen=True)
class Task:
    """One D4RL MuJoCo dataset: ``env`` (halfcheetah|hopper|walker2d) and ``kind`` (random|medium|...)."""

    env: str
    kind: str

    @property
    def name(self) -> str:
        return f"{self.env}-{self.kind}"

    @property
    def env_id(self) -> str:
        return ENVS[self.env]

    @property
    def obs_dim(self) -> int:
        return OBS_DIMS[self.env]

    @property
    def act_dim(self) -> int:
        return ACT_DIMS[self.env]

    @property
    def ref_min(self) -> float:
        return REF_RETURNS[self.env][0]

    @property
    def ref_max(self) -> float:
        return REF_RETURNS[self.env][1]

    @property
    def minari_id(self) -> str | None:
        return MINARI_IDS.get(self.name)

    def normalized_score(self, ret):
        """D4RL normalized score, 100 * (R - min) / (max - min); works on floats and arrays."""
        return 100.0 * (ret - self.ref_min) / (self.ref_max - self.ref_min)

    def __str__(self) -> str:
        return self.name


def task_names() -> list[str]:
    return [f"{env}-{kind}" for env in ENVS for kind in KINDS]


def get_task(name: str) -> Task:
    """Parse ``halfcheetah-medium`` or ``halfcheetah-medium-v2``; unknown names list the valid ones."""
    base = name.strip().lower()
    if base.endswith("-v2"):
        base = base[: -len("-v2")]
    env, _, kind = base.partition("-")
    if env not in ENVS or kind not in KINDS:
        raise UnknownTaskError(
            f"unknown task {name!r}; valid tasks (an optional '-v2' suffix is accepted): " + ", ".join(task_names())
        )
    return Task(env, kind)


def normalized_score(task: str | Task, ret):
    t = task if isinstance(task, Task) else get_task(task)
    return t.normalized_score(ret)
