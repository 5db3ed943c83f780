"""``python -m rlpost.data filter [--keep LO:HI] [--output DIR] +recipe=NAME [key=value ...]``
(also ``rlpost data filter ...``): pass rates of a dataset under the current model and
the prompts in a pass-rate band (``rlpost.data.filter``, docs/data.md). The Hydra
config is the training one: ``data.*`` is the input, ``model.*``, ``rollout.*`` and
``reward.*`` sample and score, ``filter.*`` are the filter's own keys."""

from __future__ import annotations

import argparse
import sys

from rlpost.errors import RlpostError

COMMANDS = {"filter": "sample filter.k completions per prompt, score them, keep a pass-rate band"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rlpost.data filter", description=COMMANDS["filter"])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (+recipe=NAME key=value ...)")
    parser.add_argument("--keep", metavar="LO:HI", help="pass-rate band kept (same as filter.keep=LO:HI)")
    parser.add_argument("--output", metavar="DIR", help="output folder (same as filter.output=DIR)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        lines = [f"usage: python -m rlpost.data {{{','.join(COMMANDS)}}} [options] +recipe=NAME [key=value ...]"]
        lines += [f"  {name:<8} {text}" for name, text in COMMANDS.items()]
        print("\n".join(lines), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    args = _parser().parse_intermixed_args(argv[1:])
    overrides = list(args.overrides)
    if args.keep is not None:
        overrides.append(f"filter.keep={args.keep}")
    if args.output is not None:
        overrides.append(f"filter.output={args.output}")
    from rlpost.config.load import load_config
    from rlpost.data.filter_run import run_filter

    try:
        run_filter(load_config(overrides))
    except RlpostError as err:
        print(f"rlpost data filter: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
