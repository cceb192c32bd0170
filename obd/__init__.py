"""obd: offline behavior distillation (DBC / PBC / Av-PBC) and state-density-weighted OBD (SDW)."""

__version__ = "0.1.0"
