"""CUDA-graph capture of a whole outer iteration (forward sweep, BPTT, weights), replayed per step.

One outer iteration at the published sizes is ~8,000 small kernels; launched one by one from Python
they cost more than the arithmetic (146 ms eager vs 34 ms captured on an H100). A
:class:`Graphed` function is captured once per input signature and afterwards replayed: the inputs
are copied into the graph's static tensors, the graph runs, and clones of its outputs are returned,
so a replay computes exactly what the eager call computes on the same device.

Rules of the signature: tensors (also inside a list argument) are inputs, copied in on every call;
Python values and keyword arguments are constants of the graph (they decide loop counts and shapes),
so a new value captures a new graph, as does a new tensor shape, dtype or device. A captured function
must not synchronize with the host (no ``.item()``, no ``int(tensor)``, no host-to-device copies).
Only the last signature's graph is kept (memory).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def _flatten(args: tuple) -> tuple[list[Tensor], tuple]:
    """The tensors (in order, lists flattened one level) and a hashable key of the signature."""
    tensors: list[Tensor] = []
    key: list[Any] = []

    def visit(x: Any) -> Any:
        if isinstance(x, Tensor):
            tensors.append(x)
            return ("T", tuple(x.shape), x.dtype, str(x.device))
        return ("V", x)

    for a in args:
        key.append(tuple(visit(x) for x in a) if isinstance(a, list | tuple) else visit(a))
    return tensors, tuple(key)


def _rebuild(args: tuple, static: list[Tensor]) -> tuple:
    it = iter(static)

    def take(x: Any) -> Any:
        return next(it) if isinstance(x, Tensor) else x

    return tuple([take(x) for x in a] if isinstance(a, list | tuple) else take(a) for a in args)


class Graphed:
    """``fn`` captured as a CUDA graph per signature (see the module docstring); ``keepalive`` returns
    objects the graph's memory depends on beyond its own pool (e.g. a preallocated tape), held as long
    as the graph is."""

    def __init__(
        self, fn: Callable[..., tuple[Tensor, ...]], keepalive: Callable[[], Any] | None = None, warmup: int = 2
    ):
        self.fn, self.keepalive, self.warmup = fn, keepalive, warmup
        self.key: tuple | None = None
        self.captures = 0
        self.graph: Any = None
        self.inputs: list[Tensor] = []
        self.outputs: tuple[Tensor, ...] = ()
        self.held: Any = None

    def __call__(self, *args: Any, **constants: Any) -> tuple[Tensor, ...]:
        tensors, key = _flatten(args)
        key = (key, tuple(sorted(constants.items())))
        if key != self.key:
            self._capture(args, tensors, constants, key)
        with torch.no_grad():
            for dst, src in zip(self.inputs, tensors):
                dst.copy_(src)
        self.graph.replay()
        return tuple(o.clone() for o in self.outputs)

    def _capture(self, args: tuple, tensors: list[Tensor], constants: dict, key: tuple) -> None:
        self.key = None
        self.graph, self.outputs, self.inputs, self.held = None, (), [], None  # free the previous graph first
        self.inputs = [t.detach().clone() for t in tensors]
        static_args = _rebuild(args, self.inputs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires (allocations, cuBLAS)
            for _ in range(self.warmup):
                self.fn(*static_args, **constants)
        torch.cuda.current_stream().wait_stream(side)
        self.held = self.keepalive() if self.keepalive else None
        self.graph = torch.cuda.CUDAGraph()
        # captured on the warm-up stream: library handles (cuBLAS workspaces) made there are reused
        with torch.cuda.graph(self.graph, stream=side):
            self.outputs = tuple(self.fn(*static_args, **constants))
        self.key = key
        self.captures += 1
