"""Networks shared by the behaviour SAC, the teacher and distillation.

All actors are tanh-Gaussian: ``net(obs) -> (mu, log_std)``, action = tanh(mu + std * eps).
Their deterministic action is ``tanh(mu)``; OBD's behaviour cloning loss is an MSE on that.
"""

from __future__ import annotations

import math

import torch
from torch import nn

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


def mlp(in_dim: int, out_dim: int, hidden: tuple[int, ...], orthogonal: bool = False) -> nn.Sequential:
    """ReLU MLP ``in_dim -> hidden... -> out_dim``; ``orthogonal`` uses gain sqrt(2) hidden, 1e-2 head."""
    dims = (in_dim, *hidden)
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(dims[-1], out_dim))
    if orthogonal:
        for i, layer in enumerate(m for m in layers if isinstance(m, nn.Linear)):
            last = i == len(hidden)
            nn.init.orthogonal_(layer.weight, gain=1e-2 if last else math.sqrt(2))
            nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


class TanhGaussianActor(nn.Module):
    """pi(a|s) = tanh(N(mu(s), std(s))); ``net`` outputs ``2 * act_dim`` values (mu, log_std)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...] = (256, 256), orthogonal: bool = False):
        super().__init__()
        self.act_dim = act_dim
        self.net = mlp(obs_dim, 2 * act_dim, hidden, orthogonal)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, log_std = self.net(obs).chunk(2, dim=-1)
        return mu, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)

    def deterministic(self, obs: torch.Tensor) -> torch.Tensor:
        """(B, obs_dim) -> (B, act_dim) in [-1, 1]."""
        return torch.tanh(self.net(obs)[..., : self.act_dim])

    def sample(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparameterised sample: returns the action (B, act_dim) and its log-probability (B,)."""
        mu, log_std = self(obs)
        std = log_std.exp()
        u = mu + std * torch.randn_like(mu)
        a = torch.tanh(u)
        # log N(u; mu, std) - sum log(1 - tanh(u)^2), the latter in the stable softplus form.
        logp = (-0.5 * ((u - mu) / std) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        logp = logp - (2 * (math.log(2) - u - nn.functional.softplus(-2 * u))).sum(-1)
        return a, logp


class EnsembleLinear(nn.Module):
    """``n`` independent linear layers applied as one batched matmul: (n, B, in) -> (n, B, out)."""

    def __init__(self, n: int, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, in_dim, out_dim))
        self.bias = nn.Parameter(torch.empty(n, 1, out_dim))
        bound = 1 / math.sqrt(in_dim)  # nn.Linear's default init, per member
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class EnsembleCritic(nn.Module):
    """``n`` Q-networks on concat(obs, act), evaluated together: returns (n, B)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...] = (256, 256), n: int = 2):
        super().__init__()
        self.n = n
        dims = (obs_dim + act_dim, *hidden, 1)
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(EnsembleLinear(n, a, b))
            if i < len(dims) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        x = torch.cat([obs, act], dim=-1).expand(self.n, -1, -1)
        return self.net(x).squeeze(-1)
