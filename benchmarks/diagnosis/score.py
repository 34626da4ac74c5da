"""Ground truth by outcome (no lightning_watch involved) and the scores of the default ``Watch()``."""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
from typing import Any

import lightning
import torch

from . import operators
from .runner import Spec

ALARM = ("warning", "error")

#: names the operators used before the detectors existed -> the codes lightning_watch raises, and codes
#: that also name an operator's cause. Scoring only: editing operators.py would invalidate the cached
#: ground truth, which does not depend on what counts as a cause.
CAUSE_ALIASES = {
    "loss_at_chance": ("chance_level_loss",),
    "frozen_layers": ("frozen_parameters",),
    # saturation inside a recurrent module is saturated units, where no output hook looks
    "saturated_units": ("saturated_gates",),
}
EXTRA_CAUSES = {
    "relu_logits": ("rectified_outputs",),
    "softmax_logits": ("chance_level_loss", "probability_outputs"),
    # MSE on class indices: the one-column output regressing integer labels is the fault itself
    "LCH": ("regression_on_class_indices",),
    "mse_broadcast": ("regression_on_class_indices",),
    "HDB": ("extreme_dropout",),
}


def causes_of(op) -> tuple[str, ...]:
    """Every code that names ``op``'s cause."""
    if op is None:
        return ()
    names = [alias for code in op.causes for alias in (code, *CAUSE_ALIASES.get(code, ()))]
    return tuple(dict.fromkeys([*names, *EXTRA_CAUSES.get(op.name, ())]))


_HERE = os.path.dirname(os.path.abspath(__file__))


def code_version() -> str:
    """Hash of the code that decides a run's outcome: setups, operators, the training runner, torch, Lightning."""
    h = hashlib.sha256()
    for name in ("setups.py", "operators.py", "runner.py"):
        with open(os.path.join(_HERE, name), "rb") as f:
            h.update(f.read())
    h.update(f"torch {torch.__version__} lightning {lightning.__version__}".encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------ ground truth
def load_cache(path: str, version: str) -> dict[str, dict]:
    """Cached unwatched runs of this code version, keyed ``setup/operator/seed``."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        stored = json.load(f)
    return {k: v for k, v in stored.get("runs", {}).items() if v.get("version") == version}


def save_cache(path: str, version: str, runs: dict[str, dict]) -> None:
    keep = ("val_acc", "nan", "final_loss", "param_sum", "steps", "seconds", "error")
    slim = {k: {**{f: v.get(f) for f in keep}, "version": version} for k, v in sorted(runs.items())}
    with open(path, "w") as f:
        json.dump({"version": version, "runs": slim}, f, indent=1, sort_keys=True)
        f.write("\n")


def classify(original: list[dict], mutant: list[dict]) -> dict[str, Any]:
    """``killed`` when the mutant's mean accuracy is below the original's by more than max(0.05, 3 sigma) or NaN."""
    base = [r["val_acc"] for r in original if not r.get("error")]
    accs = [r.get("val_acc", float("nan")) for r in mutant]
    nan = any(r.get("nan") for r in mutant)
    crashed = [r for r in mutant if r.get("error")]
    mean_base = statistics.fmean(base)
    sigma = statistics.stdev(base) if len(base) > 1 else 0.0
    margin = max(0.05, 3 * sigma)
    ok = [a for a, r in zip(accs, mutant) if not r.get("error") and not math.isnan(a)]
    mean = statistics.fmean(ok) if ok else float("nan")
    killed = nan or bool(crashed) or (not math.isnan(mean) and mean < mean_base - margin)
    return {
        "killed": bool(killed),
        "nan": bool(nan),
        "crashed": len(crashed),
        "acc": mean,
        "acc_original": mean_base,
        "sigma_original": sigma,
        "margin": margin,
    }


# ----------------------------------------------------------------------------------------- scoring
def _alarms(run: dict) -> list[dict]:
    return [a for a in run.get("alerts", []) if a["severity"] in ALARM]


def score(
    setups_: list[str],
    ops: list[operators.Operator],
    seeds: list[int],
    watch_seeds: list[int],
    truth_runs: dict[str, dict],
    watched: dict[Spec, dict],
    twins: dict[str, dict] | None = None,
) -> dict[str, Any]:
    """Per (setup, operator) rows and the summary figures.

    ``twins``: unwatched runs of the watched keys made on this machine, when the ground truth of
    those keys came from the cache: a run is bit-for-bit reproducible on one machine, not across
    machines (another CPU takes other kernel paths), so "watching changed nothing" is judged
    against them, and whether they reproduce the cache is reported apart.
    """
    twins = twins or {}
    rows = []
    for setup in setups_:
        original = [truth_runs[f"{setup}/{operators.ORIGINAL}/{s}"] for s in seeds]
        names = [operators.ORIGINAL] + [op.name for op in ops if setup in op.setups]
        for name in names:
            op = operators.BY_NAME.get(name)
            mutant = [truth_runs[f"{setup}/{name}/{s}"] for s in seeds]
            verdict = classify(original, mutant) if op is not None else classify(original, original)
            if op is None:
                verdict["killed"] = False
            runs = []
            for s in watch_seeds:
                w = watched[Spec(setup, name, s, True)]
                cached = truth_runs[f"{setup}/{name}/{s}"]
                u = twins.get(f"{setup}/{name}/{s}", cached)
                alarms = _alarms(w)
                causes = causes_of(op)
                same = _same_run(w, u)
                runs.append(
                    {
                        "seed": s,
                        "alarm": bool(alarms),
                        "cause": any(a["code"] in causes for a in alarms),
                        "codes": sorted({f"{a['code']}:{a['severity']}" for a in w.get("alerts", [])}),
                        "first_step": min((a["step"] for a in alarms), default=None),
                        "watch_crash": bool(w.get("error")) and not u.get("error"),
                        "error": w.get("error"),
                        "identical": bool(same),
                        # None: the ground truth was trained here, in this run (nothing to reproduce)
                        "cache_reproduced": None if u is cached else _same_run(u, cached),
                        "val_acc": w.get("val_acc"),
                    }
                )
            rows.append(
                {
                    "setup": setup,
                    "operator": name,
                    "group": op.group if op else "-",
                    "family": op.family if op else "-",
                    "description": op.description if op else "the base setup",
                    "causes": list(causes_of(op)),
                    **verdict,
                    "runs": runs,
                }
            )
    return {"rows": rows, "summary": summarize(rows)}


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _same_run(a: dict, b: dict) -> bool:
    return (
        not a.get("error")
        and not b.get("error")
        and _same(a["final_loss"], b["final_loss"])
        and _same(a["param_sum"], b["param_sum"])
    )


def _rate(hits: int, total: int) -> float | None:
    return hits / total if total else None


def summarize(rows: list[dict]) -> dict[str, Any]:
    killed = [r for r in rows if r["killed"] and r["operator"] != operators.ORIGINAL]
    alive = [r for r in rows if not r["killed"] and r["operator"] != operators.ORIGINAL]
    originals = [r for r in rows if r["operator"] == operators.ORIGINAL]
    killed_runs = [run for r in killed for run in r["runs"]]
    steps = [run["first_step"] for run in killed_runs if run["first_step"] is not None]
    every = [run for r in rows for run in r["runs"]]
    return {
        "mutants": len(killed) + len(alive),
        "killed": len(killed),
        "alive": len(alive),
        "killed_runs": len(killed_runs),
        "recall": _rate(sum(run["alarm"] for run in killed_runs), len(killed_runs)),
        "cause_recall": _rate(sum(run["cause"] for run in killed_runs), len(killed_runs)),
        # a mutant counts as detected when most of its watched seeds raised an alarm
        "recall_mutants": _rate(sum(_majority(r, "alarm") for r in killed), len(killed)),
        "cause_recall_mutants": _rate(sum(_majority(r, "cause") for r in killed), len(killed)),
        "median_first_alert_step": statistics.median(steps) if steps else None,
        "false_alarms_originals": [
            {"setup": r["setup"], "seed": run["seed"], "codes": run["codes"]}
            for r in originals
            for run in r["runs"]
            if run["alarm"]
        ],
        "original_runs": sum(len(r["runs"]) for r in originals),
        "alarms_on_alive": [
            {
                "setup": r["setup"],
                "operator": r["operator"],
                "codes": sorted({c for run in r["runs"] for c in run["codes"]}),
            }
            for r in alive
            if any(run["alarm"] for run in r["runs"])
        ],
        "watch_crashes": [
            f"{r['setup']}/{r['operator']}/{run['seed']}: {run['error']}"
            for r in rows
            for run in r["runs"]
            if run["watch_crash"]
        ],
        "runs_identical": sum(run["identical"] for run in every),
        "runs_compared": len(every),
        "cache_checked": sum(run.get("cache_reproduced") is not None for run in every),
        "cache_reproduced": sum(bool(run.get("cache_reproduced")) for run in every),
        "not_identical": [
            f"{r['setup']}/{r['operator']}/{run['seed']}"
            for r in rows
            for run in r["runs"]
            if not run["identical"] and not run["error"]
        ],
    }


def _majority(row: dict, field: str) -> bool:
    return 2 * sum(run[field] for run in row["runs"]) > len(row["runs"])


# ---------------------------------------------------------------------------------------- markdown
def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f} %"


def markdown(result: dict[str, Any], meta: dict[str, Any]) -> str:
    s = result["summary"]
    lines = [
        "# Fault benchmark of the default `Watch()`",
        "",
        f"{meta['date']} · {meta['machine']} · torch {meta['torch']} · lightning {meta['lightning']} · "
        f"lightning_watch `{meta.get('lightning_watch', '?')}` · code version `{meta['version']}` · "
        f"ground-truth seeds {meta['seeds']} · watched seeds {meta['watch_seeds']}"
        f" · {meta['seconds']:.0f} s",
        "",
        f"`{meta['command']}`",
        "",
        "| figure | value |",
        "|---|---|",
        f"| mutants (killed / alive) | {s['mutants']} ({s['killed']} / {s['alive']}) |",
        f"| recall on killed mutants (runs with a warning/error) | {_pct(s['recall'])} of {s['killed_runs']} runs |",
        f"| cause recall (an alarm whose code is in the operator's cause set) | {_pct(s['cause_recall'])} |",
        f"| recall / cause recall by mutant (majority of seeds) | {_pct(s['recall_mutants'])} / "
        f"{_pct(s['cause_recall_mutants'])} |",
        f"| median first alert step (detected killed runs) | {s['median_first_alert_step']} |",
        f"| false alarms on originals | {len(s['false_alarms_originals'])} of {s['original_runs']} runs |",
        f"| alive mutants with an alarm | {len(s['alarms_on_alive'])} of {s['alive']} |",
        f"| Watch crashes | {len(s['watch_crashes'])} |",
        f"| watched run identical to unwatched (final loss, parameters; both trained on this machine) | "
        f"{s['runs_identical']} of {s['runs_compared']} |",
        *(
            [
                f"| cached ground truth reproduced here (unwatched twins of the watched runs) | "
                f"{s['cache_reproduced']} of {s['cache_checked']} |"
            ]
            if s.get("cache_checked")
            else []
        ),
        "",
        "| setup | operator | family | acc original → mutant | killed | alarm | cause | codes fired | first step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        runs = r["runs"]
        codes = sorted({c for run in runs for c in run["codes"]})
        steps = [run["first_step"] for run in runs if run["first_step"] is not None]
        lines.append(
            f"| {r['setup']} | {r['operator']} | {r['family']} | {r['acc_original']:.3f} → {r['acc']:.3f}"
            f"{' NaN' if r['nan'] else ''} | {'**killed**' if r['killed'] else 'alive'} | "
            f"{sum(x['alarm'] for x in runs)}/{len(runs)} | {sum(x['cause'] for x in runs)}/{len(runs)} | "
            f"{', '.join(codes) or '–'} | {min(steps) if steps else '–'} |"
        )
    missed = [r for r in result["rows"] if r["killed"] and not any(run["alarm"] for run in r["runs"])]
    lines += [
        "",
        f"Killed mutants with no alarm on any watched seed ({len(missed)}): "
        + (", ".join(f"{r['setup']}/{r['operator']}" for r in missed) or "none"),
    ]
    if s["false_alarms_originals"]:
        lines += [
            "",
            "False alarms on originals: "
            + "; ".join(f"{x['setup']} seed {x['seed']}: {', '.join(x['codes'])}" for x in s["false_alarms_originals"]),
        ]
    if s["not_identical"]:
        lines += ["", "Watched runs that differ from the unwatched run: " + ", ".join(s["not_identical"])]
    if s["watch_crashes"]:
        lines += ["", "Watch crashes: " + "; ".join(s["watch_crashes"])]
    return "\n".join(lines) + "\n"
