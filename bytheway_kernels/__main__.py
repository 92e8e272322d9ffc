"""Command line: `python -m bytheway_kernels {check,info,demo} ...`."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bytheway_kernels", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser("check", help="every backend vs the reference: max error and time")
    check.add_argument("--quick", action="store_true", help="small shapes only (seconds)")
    info = commands.add_parser("info", help="which backends are available here, and why not")
    demo = commands.add_parser("demo", help="tiny offline AnimateDiff pipeline with/without ByTheWay")
    demo.add_argument("--out", default="bytheway_demo", help="output folder for the GIF and stats")
    demo.add_argument("--steps", type=int, default=10)
    demo.add_argument("--device", default="cpu")

    args = parser.parse_args(argv)
    if args.command == "check":
        from .check import run_check

        return run_check(quick=args.quick)
    if args.command == "info":
        from .check import print_info

        return print_info()
    from .integration.demo import run_demo

    return run_demo(out_dir=args.out, steps=args.steps, device=args.device)


if __name__ == "__main__":
    sys.exit(main())
