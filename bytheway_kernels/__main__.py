"""Command line: `python -m bytheway_kernels {check,info,demo} ...` (also `bytheway-kernels ...`).

Examples:
    $ python -m bytheway_kernels info
    $ python -m bytheway_kernels check --quick
    $ python -m bytheway_kernels demo --steps 4 --out bytheway_demo
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

#: The console script `pip install` makes for `main` (pyproject.toml, [project.scripts]).
CONSOLE_SCRIPT = "bytheway-kernels"


def program_name() -> str:
    """The command as the user typed it, for usage and error lines: the console script, or
    `python -m bytheway_kernels` (argparse's default would say `__main__.py`)."""
    invoked = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else ""  # .stem: bytheway-kernels.exe
    return CONSOLE_SCRIPT if invoked == CONSOLE_SCRIPT else "python -m bytheway_kernels"


def main(argv=None) -> int:
    """Parse `argv` (default: sys.argv[1:]) and run the command; returns the exit status."""
    from .integration.runs import positive_int

    parser = argparse.ArgumentParser(prog=program_name(), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser("check", help="every backend vs the reference: max error and time")
    check.add_argument("--quick", action="store_true", help="small shapes only (seconds)")
    check.add_argument("--repeats", type=positive_int, default=5,
                       help="timed repeats per backend; the median is reported with its spread "
                            "(default: %(default)s)")
    commands.add_parser("info", help="which backends are available here, and why not")
    demo = commands.add_parser("demo", help="tiny offline AnimateDiff pipeline with/without ByTheWay")
    demo.add_argument("--out", default="bytheway_demo",
                      help="output folder for the images and stats (default: %(default)s)")
    demo.add_argument("--steps", type=positive_int, default=10, help="denoising steps (>= 1; default: %(default)s)")
    demo.add_argument("--device", default="cpu", help="torch device, such as cpu or cuda (default: %(default)s)")

    args = parser.parse_args(argv)
    if args.command == "check":
        from .check import run_check

        return run_check(quick=args.quick, repeats=args.repeats)
    if args.command == "info":
        from .check import print_info

        return print_info()
    from .integration.demo import demo_problem, run_demo

    problem = demo_problem(args.out, args.steps, args.device)
    if problem:
        demo.error(problem)

    return run_demo(out_dir=args.out, steps=args.steps, device=args.device)


if __name__ == "__main__":
    sys.exit(main())
