"""``lightning-watch``: the health report and run comparison, from log directories alone.

Reads TensorBoard event files (with TensorBoard's own reader) and ``alerts.jsonl``; never imports
the code that trained the model, so it works on any machine that has the logs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from lightning_watch import __version__

if TYPE_CHECKING:
    from lightning_watch.views.eventfiles import RunData
    from lightning_watch.views.health import HealthReport

# The readers (views.*) are imported by the subcommands that use them: `--help` and `--version`
# start with argparse alone (every module here is torch-free; none imports Lightning).

#: the end-of-fit report file ``Watch`` writes next to the event files (layer types are read from it)
HEALTH_JSON = "health.json"

DESCRIPTION = """\
Look inside training runs logged by lightning_watch.

  report LOGDIR          the health report of every run under LOGDIR (finished or running)
  diff RUN_A RUN_B       the first step and the layers where two runs' statistics diverge
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-watch", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{report,diff}", required=True)
    rep = sub.add_parser(
        "report",
        help="print the health report of a run (or of every run under a directory)",
        description="Print the health report (one row per layer, then the alerts with hints) of every run "
        "under LOGDIR, read from its TensorBoard event files and alerts.jsonl.",
    )
    rep.add_argument("logdir", metavar="LOGDIR", help="a run directory, or a parent of several (e.g. lightning_logs)")
    form = rep.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="print JSON instead of a table")
    form.add_argument("--markdown", action="store_true", help="print Markdown instead of a table")
    rep.add_argument("-q", "--quiet", action="store_true", help="no progress messages on stderr")
    dif = sub.add_parser(
        "diff",
        help="compare two runs of the same model and show where they diverge",
        description="Compare two runs of the same model (two seeds, or a run that should have been "
        "reproducible): the first logging step where any statistic differs by more than RTOL, the "
        "statistics that differ there, and the step where each layer first diverged.",
    )
    dif.add_argument("run_a", metavar="RUN_A", help="run directory (or a parent holding exactly one run)")
    dif.add_argument("run_b", metavar="RUN_B", help="run directory (or a parent holding exactly one run)")
    dif.add_argument(
        "--rtol",
        type=float,
        default=1e-3,
        help="relative gap |a-b|/max(|a|,|b|) above which values differ (default: 1e-3; "
        "use ~0.1-0.5 to compare different seeds)",
    )
    dif.add_argument("--json", action="store_true", help="print JSON instead of text")
    dif.add_argument("-q", "--quiet", action="store_true", help="no progress messages on stderr")
    return parser


def _one_run(path: str, arg: str) -> str:
    from lightning_watch.views.eventfiles import NoRunsError, find_runs

    runs = find_runs(path)
    if len(runs) != 1:
        raise NoRunsError(f"`{arg}` must be one run directory, got {path!r} holding {len(runs)} runs: {runs}.")
    return runs[0]


def _report(args: argparse.Namespace) -> int:
    from lightning_watch.views.eventfiles import find_runs, read_run, stderr_progress

    progress = None if args.quiet else stderr_progress
    reports, skipped = [], []
    for run_dir in find_runs(args.logdir):
        run = read_run(run_dir, progress)
        skipped += run.skipped
        reports.append(run_report(run))
    if args.json:
        payload = {"runs": [r.to_dict() for r in reports], "skipped": [{"file": f, "reason": r} for f, r in skipped]}
        print(json.dumps(payload, indent=2, default=str))
    else:
        render = (lambda r: r.to_markdown()) if args.markdown else (lambda r: r.to_text())
        print("\n\n".join(render(r) for r in reports))
    return 0


def layer_types(run_dir: str) -> dict[str, str]:
    """``module -> type name`` from the run's ``health.json`` (written at the end of fit), if any."""
    try:
        with open(os.path.join(run_dir, HEALTH_JSON), encoding="utf-8") as f:
            layers = json.load(f).get("layers", [])
        types = {}
        for row in layers:
            for module, kind in zip(row.get("modules") or [row.get("layer")], row.get("types") or [row.get("type")]):
                if isinstance(module, str) and isinstance(kind, str):
                    types[module] = kind
        return types
    except (OSError, ValueError, AttributeError, TypeError):  # absent (a running job) or not ours
        return {}


def run_report(run: RunData) -> HealthReport:
    """The report of one run: its live alerts plus what the built-in rules find on its logged values.

    The rules run again offline (default settings) on every run with our scalars, so a run that
    had only monitors, or no alert engine, still gets a verdict; a run with no statistics at all is
    reported as not checked, never as healthy.
    """
    from lightning_watch.views.health import HealthReport
    from lightning_watch.views.offline import rediagnose

    if not run.watch_tags:
        return HealthReport.build(
            run.history(),
            run.alerts,
            run=run.path,
            not_checked="not checked: no statistics were logged (no `watch/*` scalar in the event files)",
        )
    offline = rediagnose(run.scalars)
    live = {(a.get("code"), a.get("module")) for a in run.alerts}
    extra = [a for a in offline.alerts if (a["code"], a["module"]) not in live]
    note = (
        f"re-diagnosed offline from the logged statistics: {offline.steps} logging step"
        f"{'s' * (offline.steps != 1)}, built-in rules with default settings"
        + (f", {len(extra)} alert{'s' * (len(extra) != 1)} found offline" if extra else "")
        + (f"; not re-checked: {', '.join(offline.skipped)}" if offline.skipped else "")
    )
    return HealthReport.build(
        run.history(), [*run.alerts, *extra], run=run.path, types=layer_types(run.path), notes=[note]
    )


def _diff(args: argparse.Namespace) -> int:
    from lightning_watch.views.diff import diff_scalars
    from lightning_watch.views.eventfiles import NoRunsError, read_run, stderr_progress

    progress = None if args.quiet else stderr_progress
    if not args.rtol >= 0:
        raise NoRunsError(f"`--rtol` must be a non-negative number, got {args.rtol!r}.")
    run_a = read_run(_one_run(args.run_a, "RUN_A"), progress)
    run_b = read_run(_one_run(args.run_b, "RUN_B"), progress)
    result = diff_scalars(run_a.scalars, run_b.scalars, rtol=args.rtol, run_a=run_a.path, run_b=run_b.path)
    if args.json:
        payload = result.to_dict()
        payload["skipped"] = [{"file": f, "reason": r} for f, r in run_a.skipped + run_b.skipped]
        print(json.dumps(payload, indent=2))
    else:
        print(result.to_text())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-watch`` console script (and ``python -m lightning_watch``).

    Example:
        >>> main(["report", "/nonexistent/dir"])
        2
    """
    args = build_parser().parse_args(argv)  # --help and --version exit here
    from lightning_watch.views.eventfiles import NoRunsError

    try:
        return _report(args) if args.command == "report" else _diff(args)
    except NoRunsError as err:
        print(f"lightning-watch: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `lightning-watch report ... | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
