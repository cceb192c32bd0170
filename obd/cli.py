"""``obd``: one console command for every entry point (each is also ``python -m obd.<name>``).

obd train ...      one distillation run            (obd.train)
obd sweep ...      Optuna studies, finals, report  (obd.sweep)
obd evaluate ...   re-evaluate a synthetic set     (obd.evaluate)
obd report ...     rewrite a sweep's report        (obd.report)
obd table ...      many datasets x methods x seeds (obd.table)
obd curves ...     where each dataset's plateau is (obd.curves)
obd variants ...   one dataset's recipes compared  (obd.variants)
obd stats A B      two result folders, paired      (obd.stats)
obd docs           regenerate README/docs tables   (obd.docs)
obd export ...     a distilled set as hdf5/Minari  (obd.export)
obd misalignment   BC loss vs return per dataset   (obd.misalignment)
obd data ...       generate / summarise datasets   (obd.data)
obd targets ...    teacher, Q and SDW weights      (obd.targets)
obd behavior ...   behaviour SAC: train / export   (obd.behavior)
obd bench          speed figures                   (obd.bench)
"""

from __future__ import annotations

import importlib
import sys

from obd.errors import cli

COMMANDS = {
    "train": "obd.train",
    "sweep": "obd.sweep",
    "evaluate": "obd.evaluate",
    "export": "obd.export",
    "report": "obd.report",
    "table": "obd.table",
    "curves": "obd.curves",
    "variants": "obd.variants",
    "stats": "obd.stats",
    "docs": "obd.docs",
    "targets": "obd.targets",
    "misalignment": "obd.misalignment",
    "data": "obd.data.__main__",
    "behavior": "obd.behavior.__main__",
    "bench": "obd.bench",
}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help") or args[0] not in COMMANDS:
        print(__doc__.strip())
        return 0 if args and args[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[args[0]])
    return cli(module.main, args[1:])


if __name__ == "__main__":
    sys.exit(main())
