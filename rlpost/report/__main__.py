"""``python -m rlpost.report <output_dir> [--out report.html]``"""

from __future__ import annotations

import argparse
import sys

from rlpost.report import ReportError, write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlpost.report",
                                     description="Render an HTML report of an rlpost run directory.")
    parser.add_argument("output_dir", help="the run's output_dir (holds metrics.jsonl)")
    parser.add_argument("--out", default=None, help="HTML file to write (default: <output_dir>/report.html)")
    parser.add_argument("--samples-per-step", type=int, default=4, help="completions shown per step")
    parser.add_argument("--sample-steps", type=int, default=4, help="steps whose completions are shown")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.output_dir, args.out, args.samples_per_step, args.sample_steps)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
