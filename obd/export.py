"""``python -m obd.export RUN --format d4rl|minari --out PATH``: a distilled set for other tools.

The set is written as data any offline-RL library reads: a D4RL-layout hdf5 file, or a Minari
dataset in the local Minari store (``--out`` is then its id, e.g. ``obd/halfcheetah-medium-sdw-v0``).
States are in the environment's raw scale (float64, ``s * std + mean``); each (state, action) pair
is one single-step episode (reward 0, truncated), as a synthetic set has no dynamics. The metadata
(``metadata/obd`` in the hdf5 file, the description of a Minari dataset) holds one JSON object:
the normalization statistics, the evaluation learner's recipe and seed, and the run's provenance
(task, method, seed, data hash, score, versions). ``python -m obd.evaluate`` reads both formats and
re-evaluates with that recipe and seed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from obd.errors import cli


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m obd.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("run", help="a run directory of python -m obd.train (or its synthetic.npz)")
    p.add_argument("--format", choices=("d4rl", "minari"), required=True, help="d4rl (hdf5 file) or minari")
    p.add_argument(
        "--out",
        required=True,
        help="d4rl: the .hdf5 path; minari: the dataset id "
        "(e.g. obd/halfcheetah-medium-sdw-v0) in MINARI_DATASETS_PATH",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing file or Minari dataset")
    return p


def main(argv: list[str] | None = None) -> int:
    from obd.synthetic_set import export_d4rl, export_minari, load_run

    a = parser().parse_args(argv)
    syn, metrics = load_run(Path(a.run))
    if a.format == "d4rl":
        print(export_d4rl(syn, metrics, Path(a.out), force=a.force))
    else:
        print(f"minari:{export_minari(syn, metrics, a.out, force=a.force)}")
    return 0


if __name__ == "__main__":
    sys.exit(cli(main))
