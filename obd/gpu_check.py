"""``make gpu-check``: the checks that need a GPU, then the bench on cuda, as one JSON line.

Runs the CUDA-marked tests (device placement, batched vs separate on the GPU, CUDA-graph replay vs
eager), then the figures on cuda: one run eager vs graph, K = 1, 8, 16, 32 runs together (graph)
and K = 16 eager. Without a CUDA device it says so and exits 0, so
the target is safe to call anywhere. Meant to finish well under 8 minutes on one GPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print(
            json.dumps(
                {
                    "gpu_check": "skipped",
                    "reason": f"no CUDA device (torch {torch.__version__}, cuda {torch.version.cuda})",
                }
            )
        )
        return 0
    t0 = time.time()
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "--timeout", "300"], capture_output=True, text=True
    )
    from obd.bench import bench_runs
    from obd.devices import resolve_device

    cuda = resolve_device("cuda")
    figures = bench_runs(cuda, (1, 8, 16, 32), repeat=3)
    eager = bench_runs(cuda, (1, 16), repeat=3, graph=False)
    tail = tests.stdout.strip().splitlines()[-1] if tests.stdout.strip() else tests.stderr[-300:]
    print(
        json.dumps(
            {
                "gpu_check": "ok" if tests.returncode == 0 else "tests failed",
                "device": torch.cuda.get_device_name(0),
                "torch": torch.__version__,
                "tests": tail,
                "outer_iter_per_run_s": {"cuda": figures},
                "outer_iter_per_run_eager_s": {"cuda": eager},
                "seconds": round(time.time() - t0, 1),
            }
        )
    )
    return 0 if tests.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
