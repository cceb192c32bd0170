"""Behaviour data: the online SAC agents whose rollouts make the generated D4RL-style datasets.

- :mod:`obd.behavior.sac`: behaviour SAC, resumable (state in ``OBD_DATA_DIR/sac/ENV-seedS``);
- :mod:`obd.behavior.export`: a SAC run -> the small policy file generation reads (medium,
  medium-replay snapshots, expert);
- :mod:`obd.behavior.generate`: the datasets (random, medium, medium-replay, expert, medium-expert).

CLI: ``python -m obd.behavior train|export`` and ``python -m obd.data collect``.
"""
