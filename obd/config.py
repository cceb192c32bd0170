"""Every setting of a run, in one place: typed dataclasses at the published defaults.

One builder, :func:`build_config`, makes a :class:`RunConfig` for ``obd.train`` and for every
trial and final of ``obd.sweep``, from layers applied in this order:

    dataclass defaults  <  budget YAML (sweeps/budgets/NAME.yaml, its ``when`` clauses too)
                        <  the given layers (a --config file, a trial's parameters, CLI flags)

Every value is checked against its field's type and range when it is applied (one-line
:class:`~obd.errors.ConfigError` naming the key), so a typo or a wrong type fails before any
work starts. This module imports nothing heavy: ``--help`` stays fast.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.resources
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from obd.errors import ConfigError

Method = Literal["dbc", "pbc", "avpbc", "sdw", "random", "random-teacher", "kmeans-teacher"]
DISTILL_METHODS: tuple[str, ...] = ("dbc", "pbc", "avpbc", "sdw")
METHODS: tuple[str, ...] = get_args(Method)
# Sets that need no outer loop (baselines): a start of obd.starts, evaluated as it is.
BASELINE_START: dict[str, str] = {
    "random": "real-pairs",
    "random-teacher": "teacher-labelled",
    "kmeans-teacher": "kmeans",
}
# real-pairs: random real states with their dataset actions (published); teacher-labelled: the same
# states with pi*(s); kmeans: the real state nearest each faiss k-means centroid, with pi*(s).
SyntheticStart = Literal["real-pairs", "teacher-labelled", "kmeans"]
OuterLrSchedule = Literal["constant", "cosine"]  # cosine: lr decays to 0 at the last outer step
InnerPrecision = Literal["float32", "bfloat16"]
OuterOptimizer = Literal["sgd", "adam"]
QNegative = Literal["keep", "zero"]  # keep: beta * Q as published; zero: negative Q weighs 0
InnerOptimizer = Literal["sgd", "adam"]
GradFn = Literal["fast", "unrolled"]
# official: orthogonal with gain sqrt(2) on every layer, head included, zero biases (the OBD code's
# init_module_weights); corl: the same with gain 1e-2 on the head (a newer CORL habit).
PolicyInit = Literal["official", "corl"]
DensityEstimator = Literal["knn-kde", "kde"]  # kde: the untruncated kernel sum (an ablation; O(N x n_ref))
Device = Literal["auto", "cpu", "cuda"]  # auto: cuda when available


def _rng(lo: float | None = None, hi: float | None = None, *, gt: float | None = None) -> dict:
    return {"min": lo, "max": hi, "gt": gt}


@dataclass
class DataConfig:
    """Stage 1, the dataset."""

    source: str = "halfcheetah-medium"  # task name (generated), D4RL hdf5 path, d4rl:TASK, minari:ID
    task: str | None = None  # env + normalization; read off the source when None
    size: int | None = field(default=None, metadata=_rng(1))  # generated datasets: transitions (None: D4RL's)
    data_seed: int = field(default=0, metadata=_rng(0))  # generated datasets: which one


@dataclass
class TD3BCConfig:
    """TD3+BC (Fujimoto & Gu, 2021) at CORL's defaults."""

    steps: int = field(default=1_000_000, metadata=_rng(1))  # gradient steps
    batch_size: int = field(default=256, metadata=_rng(1))
    hidden: tuple[int, ...] = (256, 256)  # actor and critic hidden widths
    actor_lr: float = field(default=3e-4, metadata=_rng(gt=0))
    critic_lr: float = field(default=3e-4, metadata=_rng(gt=0))
    gamma: float = field(default=0.99, metadata=_rng(0, 1))
    tau: float = field(default=0.005, metadata=_rng(0, 1))
    policy_noise: float = field(default=0.2, metadata=_rng(0))
    noise_clip: float = field(default=0.5, metadata=_rng(0))
    policy_freq: int = field(default=2, metadata=_rng(1))
    alpha: float = field(default=2.5, metadata=_rng(0))  # BC trade-off: lambda = alpha / mean|Q|
    seed: int = field(default=0, metadata=_rng(0))


@dataclass
class TeacherConfig:
    """Stage 2a, the teacher pi* and its critic Q."""

    path: str | None = None  # a teacher file (obd's own, or a CORL checkpoint); None trains TD3+BC
    td3bc: TD3BCConfig = field(default_factory=TD3BCConfig)
    eval_episodes: int = field(default=20, metadata=_rng(0))  # rollouts that score the teacher (its s.e. is logged)


@dataclass
class DensityConfig:
    """Stage 2b, SDW's state density, and the weights made from it.

    The estimate (estimator, k, bandwidth, max_reference, exact_limit, nprobe, seed) is cached per
    dataset; ``alpha`` and ``clip`` turn it into weights w ~ p^-alpha when a run loads it.
    """

    estimator: DensityEstimator = "knn-kde"
    k: int = field(default=10, metadata=_rng(1))  # neighbours in the kernel sum
    bandwidth: float | None = field(default=None, metadata=_rng(gt=0))  # None: Scott's rule
    max_reference: int = field(default=200_000, metadata=_rng(1))  # reference subsample above this size
    exact_limit: float = field(default=2e10, metadata=_rng(0))  # queries * references up to this: exact k-NN
    nprobe: int = field(default=8, metadata=_rng(1))
    seed: int = field(default=0, metadata=_rng(0))
    alpha: float = field(default=1.0, metadata=_rng(0))  # w ~ p^-alpha; 0 gives uniform weights (plain OBD)
    clip: float | None = field(default=10.0, metadata=_rng(gt=1))  # cap on w / mean(w); None: no cap

    def estimate_key(self) -> dict:
        """The fields the cached log-density depends on (alpha and clip are applied on load)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("alpha", "clip")}


@dataclass
class DistillConfig:
    """Stage 3, distillation. Published OBD defaults (Lei et al., 2024)."""

    method: Method = "avpbc"  # the outer objective, or a baseline set that skips distillation
    n_synthetic: int = field(default=256, metadata=_rng(1))  # synthetic (state, action) pairs
    inner_steps: int = field(default=100, metadata=_rng(1))  # T, full-batch SGD steps of the inner loop
    inner_lr: float = field(default=0.1, metadata=_rng(gt=0))  # the inner loop's SGD learning rate
    hidden: tuple[int, ...] = (256, 256, 256)  # the policy's hidden widths
    init: PolicyInit = "official"  # the policy's init: official (gain sqrt(2) everywhere) | corl (1e-2 head)
    outer_optimizer: OuterOptimizer = "sgd"  # sgd (published) | adam (the short budgets)
    outer_lr: float = field(default=0.1, metadata=_rng(gt=0))  # on the synthetic states and actions
    outer_lr_schedule: OuterLrSchedule = "constant"  # constant | cosine (to 0 at the last outer step)
    start: SyntheticStart = "real-pairs"  # the synthetic set's initialization (obd.starts)
    outer_momentum: float = field(default=0.9, metadata=_rng(0, 1))  # sgd only
    grad_clip: float = field(default=2.0, metadata=_rng(gt=0))  # max norm of the outer gradient
    test_batches: int = field(default=10, metadata=_rng(1))  # outer loss over test_batches x batch_size states
    batch_size: int = field(default=256, metadata=_rng(1))  # real states per outer batch
    beta: float = field(default=0.02, metadata=_rng(gt=0))  # Av-PBC weight = beta * Q(s, pi*(s))
    # keep (published): a state whose Q is negative gets a negative weight, so the outer loss pushes the
    # policy away from pi*(s) there; zero: those states weigh 0 (the short budgets)
    q_negative: QNegative = "keep"
    # None: beta as given (published). Else beta * q_reference / (the teacher's median Q over the data): the
    # weights get the scale beta was set for with another teacher (the authors' Cal-QL on halfcheetah-medium:
    # a median Q of about 491); under SGD the outer step scales with it, under Adam nothing changes.
    q_reference: float | None = field(default=None, metadata=_rng(gt=0))
    truncate: int | None = field(default=None, metadata=_rng(1))  # truncated BPTT: the last K inner steps only
    cuda_graph: bool = True  # on CUDA: the outer iteration captured once and replayed (obd.cuda_graphs)
    inner_precision: InnerPrecision = "float32"  # bfloat16: the kernel's products in bf16 (docs/performance.md)
    seed: int = field(default=0, metadata=_rng(0))  # the run seed: init, batches, evaluation


@dataclass
class EvalConfig:
    """Stage 4, evaluation: the fixed published learner, never derived from the distillation settings."""

    policies: int = field(default=10, metadata=_rng(1))  # fresh policies trained per evaluation
    episodes: int = field(default=10, metadata=_rng(1))  # rollouts per policy
    last_k: int | None = field(default=None, metadata=_rng(1))  # score = mean of the last K; None: 5 (avpbc, sdw) / 10
    inner_steps: int = field(default=100, metadata=_rng(1))  # the learner's full-batch steps
    inner_lr: float = field(default=0.1, metadata=_rng(gt=0))  # the learner's learning rate
    hidden: tuple[int, ...] = (256, 256, 256)  # the learner's hidden widths
    init: PolicyInit = "official"  # the learner's init
    optimizer: InnerOptimizer = "sgd"  # the learner's optimizer
    ensemble: bool = False  # the paper's Table 3: one agent acting with the policies' mean action

    def k_for(self, method: str) -> int:
        return self.last_k or (5 if method in ("avpbc", "sdw") else 10)


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    density: DensityConfig = field(default_factory=DensityConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    outer_steps: int = field(default=50_000, metadata=_rng(0))  # outer iterations of the run
    eval_every: int = field(default=1_000, metadata=_rng(0))  # coarse evaluations; 0: none before the scored ones
    # The scored evaluations (the last K, see EvalConfig.k_for) lie in this final fraction of the run,
    # spaced min(eval_every, eval_window * outer_steps / (K - 1)) apart and ending at the last step.
    eval_window: float = field(default=0.2, metadata=_rng(gt=0, hi=1))
    checkpoint_every: int = field(default=200, metadata=_rng(1))  # outer steps between checkpoints
    grad_fn: GradFn = "fast"  # fast (hand-derived BPTT) | unrolled (plain autograd, the oracle)
    device: Device = "auto"  # auto (cuda when available) | cpu | cuda
    threads: int = field(default=2, metadata=_rng(1))  # torch threads
    out: str | None = None  # default runs/{task}-{method}-s{seed}
    wandb: bool = True  # a W&B run (offline unless logged in)
    wandb_project: str = "obd"
    wandb_group: str | None = None  # studies: TASK-BUDGET-OUT; tables: table-BUDGET-OUT
    wandb_job_type: str | None = None  # trial | final | baseline (set by studies and tables)
    wandb_name: str | None = None  # default TASK-METHOD-sSEED
    budget: str | None = None  # set by build_config to the budget it applied

    def scored_from(self) -> int:
        """The first outer step whose evaluation may enter the run's score."""
        if self.distill.method in BASELINE_START:
            return 0  # nothing is distilled: every evaluation sees the same set
        return math.ceil((1 - self.eval_window) * self.outer_steps)

    def evaluation_steps(self) -> list[int]:
        """Outer steps evaluated: every ``eval_every`` before the scored window (coarse), then the K scored
        ones, evenly spaced and ending at the last step."""
        T = self.outer_steps
        if self.distill.method in BASELINE_START or T == 0:
            return [0]
        k = self.eval.k_for(self.distill.method)
        every = self.eval_every or T
        spacing = max(1, min(every, int(self.eval_window * T / (k - 1)))) if k > 1 else every
        scored = [T - j * spacing for j in range(k) if T - j * spacing >= max(1, self.scored_from())]
        return sorted({s for s in range(every, T + 1, every) if s < min(scored)} | set(scored))


# ------------------------------------------------------------------ checked merging


def type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, get_args(tp)))
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in get_args(tp))
    if origin is tuple:
        return f"a list of {type_name(get_args(tp)[0])}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any) -> Any:
    """``value`` as type ``tp``, or raise TypeError. Ints are not floats' substitutes the other way."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _coerce(value, arg)
            except TypeError:
                continue
        raise TypeError
    if origin is Literal:
        if value in get_args(tp) and not isinstance(value, bool):
            return value
        raise TypeError
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError
        return tuple(_coerce(v, get_args(tp)[0]) for v in value)
    if tp is type(None):
        if value is None:
            return None
        raise TypeError
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError
    raise TypeError


def _check_range(key: str, value: Any, meta: typing.Mapping) -> None:
    if value is None or not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    lo, hi, gt = meta.get("min"), meta.get("max"), meta.get("gt")
    if (lo is not None and value < lo) or (hi is not None and value > hi) or (gt is not None and value <= gt):
        bounds = [
            f">= {lo}" if lo is not None else "",
            f"> {gt}" if gt is not None else "",
            f"<= {hi}" if hi is not None else "",
        ]
        raise ConfigError(f"config key '{key}': must be {' and '.join(b for b in bounds if b)}, got {value!r}")


def merge(cfg: Any, updates: typing.Mapping, where: str = "") -> Any:
    """Apply a nested mapping to a (nested) config dataclass in place, checking keys, types and ranges."""
    if not isinstance(updates, typing.Mapping):
        raise ConfigError(f"config key '{where.rstrip('.') or '(top level)'}': expected a mapping, got {updates!r}")
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    hints = typing.get_type_hints(type(cfg))
    for k, v in updates.items():
        key = f"{where}{k}"
        if k not in fields:
            raise ConfigError(
                f"unknown config key '{key}'; known under '{where.rstrip('.') or '(top level)'}': {', '.join(fields)}"
            )
        cur = getattr(cfg, k)
        if dataclasses.is_dataclass(cur):
            merge(cur, v, f"{key}.")
            continue
        try:
            value = _coerce(v, hints[k])
        except TypeError:
            raise ConfigError(f"config key '{key}': expected {type_name(hints[k])}, got {v!r}") from None
        _check_range(key, value, fields[k].metadata)
        if isinstance(value, tuple):
            for x in value:
                _check_range(key, x, {"min": 1})
        setattr(cfg, k, value)
    return cfg


def nest(dotted: typing.Mapping[str, Any]) -> dict:
    """{"distill.inner_lr": 0.1} -> {"distill": {"inner_lr": 0.1}}."""
    out: dict = {}
    for key, v in dotted.items():
        d = out
        *parents, leaf = key.split(".")
        for p in parents:
            d = d.setdefault(p, {})
        d[leaf] = v
    return out


def flatten(nested: typing.Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"distill": {"inner_lr": 0.1}} -> {"distill.inner_lr": 0.1}: the inverse of :func:`nest`."""
    out: dict[str, Any] = {}
    for k, v in nested.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def deep_update(base: dict, upd: typing.Mapping) -> dict:
    out = copy.deepcopy(base)
    for k, v in upd.items():
        out[k] = deep_update(out[k], v) if isinstance(v, typing.Mapping) and isinstance(out.get(k), dict) else v
    return out


def field_type(dotted: str) -> Any:
    """The declared type of a dotted RunConfig key, or ConfigError if there is no such key."""
    cls: Any = RunConfig
    *parents, leaf = dotted.split(".")
    for p in parents:
        hints = typing.get_type_hints(cls)
        if p not in hints or not dataclasses.is_dataclass(hints[p]):
            raise ConfigError(f"unknown config key '{dotted}'")
        cls = hints[p]
    hints = typing.get_type_hints(cls)
    if leaf not in hints or dataclasses.is_dataclass(hints[leaf]):
        raise ConfigError(f"unknown config key '{dotted}'")
    return hints[leaf]


# ------------------------------------------------------------------ YAML files: budgets and studies


def sweeps_dir() -> Path:
    """``sweeps/`` at the repository's top level, or its copy inside an installed package."""
    repo = Path(__file__).resolve().parent.parent / "sweeps"
    if (repo / "budgets").is_dir():
        return repo
    return Path(str(importlib.resources.files("obd") / "_sweeps"))


def budget_names() -> list[str]:
    return sorted(p.stem for p in (sweeps_dir() / "budgets").glob("*.yaml"))


def read_yaml(path: Path) -> Any:
    """A YAML file's content; a missing file or a syntax error is one line naming the file and line."""
    import yaml

    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        raise ConfigError(f"{path}: YAML syntax error at {where}: {e.problem}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a YAML file ({str(e).splitlines()[0]})") from None


def check_choices(methods: typing.Sequence[str], allowed: typing.Sequence[str], budget: str | None = None) -> None:
    """One line naming what is unknown among ``methods`` (and ``budget``), with the valid choices."""
    bad = [m for m in methods if m not in allowed]
    if bad:
        raise ConfigError(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(allowed)}")
    if budget is not None and budget not in budget_names():
        raise ConfigError(f"unknown budget {budget!r}; choose one of {', '.join(budget_names())}")


def load_budget(name: str) -> dict:
    """The budget's YAML mapping: config keys, plus ``when`` clauses (list of {env?, kind?, method?, set})."""
    path = sweeps_dir() / "budgets" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown budget {name!r}; choose one of {', '.join(budget_names())}")
    spec = read_yaml(path) or {}
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: a budget is a mapping of config keys")
    for clause in spec.get("when") or []:
        if not isinstance(clause, dict) or not set(clause) <= {"env", "kind", "method", "set"}:
            raise ConfigError(f"{path}: a when clause is a mapping of env?, kind?, method? and set, not {clause!r}")
    return spec


def _matches(clause: dict, task: tuple[str, str] | None, method: str) -> bool:
    def hit(want: Any, have: str | None) -> bool:
        return want is None or have in ([want] if isinstance(want, str) else want)

    env, kind = task or (None, None)
    return hit(clause.get("env"), env) and hit(clause.get("kind"), kind) and hit(clause.get("method"), method)


def build_config(budget: str, layers: typing.Sequence[typing.Mapping] = ()) -> RunConfig:
    """The RunConfig of ``budget`` with ``layers`` applied in order (later wins).

    The budget's ``when`` clauses select on ``env`` (halfcheetah|hopper|walker2d), ``kind``
    (medium, medium-expert, ...) and ``method``; env and kind are read off the merged
    ``data.task`` / ``data.source`` where that is a task name.
    """
    spec = load_budget(budget)
    when = spec.pop("when", None) or []
    probe = RunConfig()
    for layer in layers:
        merge(probe, layer)
    task = _task_of(probe.data)
    cfg = merge(RunConfig(), spec)
    for clause in when:
        if _matches(clause, task, probe.distill.method):
            merge(cfg, clause.get("set") or {})
    for layer in layers:
        merge(cfg, layer)
    cfg.budget = budget
    return cfg


def _task_of(data: DataConfig) -> tuple[str, str] | None:
    """(env, kind) of the run's task name, or None when the source is a file that names no task."""
    from obd.data.tasks import ENVS, KINDS

    for name in (data.task, data.source.removeprefix("d4rl:")):
        env, _, kind = (name or "").partition("-")
        if env in ENVS and kind in KINDS:
            return env, kind
    return None


def to_dict(cfg: Any) -> dict:
    """A config as plain YAML/JSON-able data (tuples as lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))
