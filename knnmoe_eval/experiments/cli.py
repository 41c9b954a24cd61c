"""`python -m knnmoe_eval.experiments table|ablate ...`: one flag per `Settings` field, help from its metadata."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import fields

from . import ablations, runner
from .ablations import ABLATIONS
from .runner import METHODS, TABLE1, Runner, Settings, table


def _parse(value: str, annotation: str):
    """A command-line string as the setting's type (annotations are strings under `from __future__`)."""
    if annotation.startswith("tuple"):
        item = annotation.removeprefix("tuple[").split(",")[0].split("|")[0].strip()
        return tuple(None if v == "all" else _parse(v, item) for v in value.split(","))
    if annotation.startswith("dict"):
        return json.loads(value)
    if annotation.startswith("bool"):
        return value if annotation.startswith("bool | str") and value not in ("true", "false") else value != "false"
    if annotation.startswith("int"):
        return int(value)
    if annotation.startswith("float"):
        return float(value)
    return value


def parser() -> argparse.ArgumentParser:
    """`python -m knnmoe_eval.experiments`'s command line, one flag per `Settings` field."""
    width = max(map(len, METHODS))
    epilog = "methods (--methods; * = the paper's Table 1, the default):\n" + "\n".join(
        f"  {key:<{width}} {'*' if key in TABLE1 else ' '} {row}: {help}" for key, (row, help) in METHODS.items())
    p = argparse.ArgumentParser(prog="python -m knnmoe_eval.experiments", description=runner.__doc__, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("table", "ablate"))
    p.add_argument("--which", default=",".join(ABLATIONS),
                   help=f"ablate: comma-separated, from {', '.join(ABLATIONS)}")
    for f in fields(Settings):
        kw = {"help": f"{f.metadata['help']} (default: {f.metadata['default']})", **f.metadata["argparse"]}
        if str(f.type).startswith("bool") and "nargs" not in kw:
            kw["action"] = "store_true"
        elif "nargs" in kw:
            kw["const"] = True
        p.add_argument(f"--{f.name}", default=None, **kw)
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    values = {}
    for f in fields(Settings):
        value = getattr(args, f.name)
        if value is None or value is False:
            continue
        values[f.name] = _parse(value, str(f.type)) if isinstance(value, str) else value
    return Settings(**values)


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    runner = Runner(settings_from_args(args))
    if args.command == "table":
        table(runner)
        print((runner.out / "table.md").read_text())
    else:
        for name in args.which.split(","):
            print(ablations.ablate(runner, name))
