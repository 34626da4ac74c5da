"""Command line of the fault benchmark (``python benchmarks/diagnosis.py --help``)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any

import lightning
import torch

from . import operators, score, setups
from .runner import Spec, run_many

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TRUTH = os.path.join(_ROOT, "diagnosis_ground_truth.json")
DEFAULT_OUT = os.path.join(_ROOT, "results")

#: the CI subset: clear-cut faults today's Watch already names, and a few it misses (<= 60 s on 2 cores)
QUICK_SETUPS = "mlp"
QUICK_OPERATORS = "HLR_x100,softmax_batch,no_zero_grad"


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _revision(path: str) -> str:
    """``<commit>`` of the lightning_watch checkout measured, ``+dirty`` when it has uncommitted changes."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=path, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "."], cwd=path, capture_output=True, text=True)
    except OSError:
        return "unknown"
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") or "unknown"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--setups", default=None, help=f"comma-separated, of {sorted(setups.SETUPS)} (default: all)")
    p.add_argument("--operators", default=None, help="comma-separated operator names (default: all)")
    p.add_argument("--seeds", type=_ints, default=[0, 1, 2], help="ground-truth seeds (default 0,1,2)")
    p.add_argument("--watch-seeds", type=_ints, default=None, help="seeds of the watched runs (default: --seeds)")
    p.add_argument("--quick", action="store_true", help=f"fast subset: {QUICK_SETUPS} x {QUICK_OPERATORS}")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (each a forked process)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before a run is killed")
    p.add_argument("--out", default=DEFAULT_OUT, help="directory of diagnosis.json / diagnosis.md")
    p.add_argument("--ground-truth", default=DEFAULT_TRUTH, help="ground-truth cache (JSON)")
    p.add_argument("--no-cache", action="store_true", help="recompute the ground truth (the cache is not written)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="combine result files of earlier runs, train nothing")
    p.add_argument("--healthy", action="store_true", help="the healthy programs instead (healthy.md/json in --out)")
    p.add_argument("--real", action="store_true", help="the healthy real models (real_models.md/json in --out)")
    p.add_argument("--programs", default=None, help="comma-separated, with --healthy or --real (default: all)")
    return p


def merge(paths: list[str], out: str) -> dict[str, Any]:
    """One table from result files of runs over disjoint setups (e.g. a long benchmark run in parts)."""
    parts = []
    for path in paths:
        with open(path) as f:
            parts.append(json.load(f))
    rows = [row for part in parts for row in part["rows"]]
    keys = [(r["setup"], r["operator"]) for r in rows]
    if len(set(keys)) != len(keys):
        raise ValueError(f"`--merge` files must cover disjoint setups, got {sorted({k[0] for k in keys})!r} twice.")
    meta = dict(parts[0]["meta"])
    meta["seconds"] = sum(p["meta"]["seconds"] for p in parts)
    meta["command"] = " + ".join(p["meta"]["command"] for p in parts)
    meta["date"] = ", ".join(sorted({p["meta"]["date"] for p in parts}))
    meta["lightning_watch"] = ", ".join(sorted({p["meta"].get("lightning_watch", "?") for p in parts}))
    result = {"rows": rows, "summary": score.summarize(rows), "meta": meta, "merged_from": paths}
    result["watched_runs"] = {k: v for p in parts for k, v in p.get("watched_runs", {}).items()}
    _write(result, out, "diagnosis")
    return result


def _write(result: dict[str, Any], out: str, stem: str) -> str:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
        f.write("\n")
    text = score.markdown(result, result["meta"])
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write(text)
    return text


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    torch.set_num_threads(1)
    if args.healthy or args.real:
        from . import healthy

        return healthy.main(args, argv, real=args.real)
    if args.quick:
        args.setups = args.setups or QUICK_SETUPS
        args.operators = args.operators or QUICK_OPERATORS
        args.watch_seeds = args.watch_seeds or [0]
    names = args.setups.split(",") if args.setups else list(setups.SETUPS)
    for name in names:
        setups.config(name)  # ValueError naming the valid setups
    ops = operators.select(args.operators)
    seeds = args.seeds
    watch_seeds = args.watch_seeds or seeds
    if len(seeds) < 2:
        raise ValueError(f"`--seeds` needs at least 2 seeds for a sigma, got {seeds!r}.")
    if not set(watch_seeds) <= set(seeds):
        raise ValueError(f"`--watch-seeds` must be a subset of --seeds {seeds}, got {watch_seeds!r}.")
    start = time.perf_counter()
    version = score.code_version()
    cache = {} if args.no_cache else score.load_cache(args.ground_truth, version)
    cells = [(s, op) for s in names for op in [operators.ORIGINAL] + [o.name for o in ops if s in o.setups]]
    truth_specs = [Spec(s, op, seed, False) for s, op in cells for seed in seeds]
    todo = [spec for spec in truth_specs if spec.key not in cache]
    if not args.quiet:
        print(f"ground truth: {len(truth_specs) - len(todo)} cached, {len(todo)} to run", flush=True)
    truth = dict(cache)
    for name in names:  # one setup at a time, saved as it completes: an interrupted run keeps its work
        fresh = run_many([t for t in todo if t.setup == name], jobs=args.jobs, timeout=args.timeout,
                         progress=not args.quiet)  # fmt: skip
        truth.update({spec.key: result for spec, result in fresh.items()})
        if not args.no_cache and fresh:
            stored = score.load_cache(args.ground_truth, version)
            stored.update({spec.key: result for spec, result in fresh.items()})
            score.save_cache(args.ground_truth, version, stored)
    # imported once, before the forks: every watched run uses the same code, loaded once
    import lightning_watch

    watched_specs = [Spec(s, op, seed, True) for s, op in cells for seed in watch_seeds]
    if not args.quiet:
        print(f"watched runs: {len(watched_specs)}", flush=True)
    watched = run_many(watched_specs, jobs=args.jobs, timeout=args.timeout, progress=not args.quiet)
    # a run is bit-for-bit reproducible on one machine only: the unwatched twins of watched runs whose
    # ground truth came from the cache are trained here too, for the "watching changed nothing" check
    trained_here = {spec.key for spec in todo}
    twin_specs = [Spec(s.setup, s.operator, s.seed, False) for s in watched_specs if s.key not in trained_here]
    if twin_specs and not args.quiet:
        print(f"unwatched twins (cached ground truth, compared on this machine): {len(twin_specs)}", flush=True)
    twins = run_many(twin_specs, jobs=args.jobs, timeout=args.timeout, progress=not args.quiet)
    result = score.score(names, ops, seeds, watch_seeds, truth, watched, {t.key: r for t, r in twins.items()})
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} {os.cpu_count()} CPU cores, torch threads 1, jobs {args.jobs}",
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
        "version": version,
        "lightning_watch": _revision(os.path.dirname(os.path.abspath(lightning_watch.__file__))),
        "seeds": ",".join(map(str, seeds)),
        "watch_seeds": ",".join(map(str, watch_seeds)),
        "seconds": time.perf_counter() - start,
        "command": "python benchmarks/diagnosis.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    result["meta"] = meta
    result["watched_runs"] = {spec.key: run for spec, run in watched.items()}
    text = _write(result, args.out, "diagnosis_quick" if args.quick else "diagnosis")
    if not args.quiet:
        print(text)
    return result
