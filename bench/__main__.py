"""``python -m bench [--quick] [--only NAME ...] [--output_dir bench] [--report BENCHMARKS.md]``

Runs each comparison in its own process (:mod:`bench.worker`), collects their results into
``<output_dir>/results.json`` and writes the report with its figures under
``<output_dir>/figures/``. ``--quick`` runs everything tiny (a smoke test, not figures to quote)
and by default writes under ``bench/results/quick/`` so it never overwrites the real report.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.worker import COMPARISONS
from serving.storage import write_json_atomic, write_text_atomic

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test that takes minutes")
    p.add_argument("--only", nargs="+", choices=list(COMPARISONS), help="run only these comparisons")
    p.add_argument("--output_dir", default=None,
                   help="results.json and figures/ go here (default: bench, or bench/results/quick with --quick)")
    p.add_argument("--report", default=None,
                   help="the markdown report (default: BENCHMARKS.md beside bench/, or OUTPUT_DIR/BENCHMARKS.md "
                        "with --quick)")
    p.add_argument("--cache_dir", default=None, help="where built data and models are cached (default bench/.cache)")
    p.add_argument("--timeout_s", type=int, default=3600, help="limit for each comparison's process")
    return p.parse_args(argv)


def _worker(name: str, args: argparse.Namespace, profile: str, figures_dir: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "bench.worker", name, "--profile", profile, "--output_json", out,
               "--figures_dir", figures_dir]
        if args.cache_dir:
            cmd += ["--cache_dir", args.cache_dir]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(HERE),
                                                                          os.environ.get("PYTHONPATH")])))
        t0 = time.perf_counter()
        print(f"[bench] {name} ...", flush=True)
        try:
            proc = subprocess.run(cmd, env=env, timeout=args.timeout_s)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {args.timeout_s} s"}
        print(f"[bench] {name} done in {time.perf_counter() - t0:.0f} s (exit {proc.returncode})", flush=True)
        if proc.returncode != 0 or not os.path.exists(out):
            return {"error": f"worker exited with status {proc.returncode} (see its output above)"}
        with open(out) as f:
            return json.load(f)


def _previous(path: str, profile: dict, build: dict, rerun: list[str]) -> dict:
    """The last run's comparisons that are still valid: the same trained model (its export's
    fingerprint: the same recipes rebuilt on another machine train other weights), same backbone
    recipe, same data and classifier sizes, and none of the comparison's own profile fields changed. Each dropped
    comparison is named with the reason, so ``--only`` never loses a result silently."""
    from bench.profiles import ASSET_FIELDS, COMPARISON_FIELDS

    if not os.path.exists(path):
        return {}
    with open(path) as f:
        old = json.load(f)
    profile = json.loads(json.dumps(profile))  # tuples as the JSON file holds them
    kept = {}
    for name, result in old.get("comparisons", {}).items():
        if name in rerun:
            continue
        ran_with = result.get("profile") or old.get("profile") or {}
        if build.get("model_fingerprint") is None or \
                (old.get("build") or {}).get("model_fingerprint") != build.get("model_fingerprint"):
            changed = ["trained model (another build: its export's fingerprint differs or was not recorded)"]
        elif (old.get("build") or {}).get("backbone", {}).get("recipe") != build.get("backbone", {}).get("recipe"):
            changed = ["backbone recipe"]
        else:
            fields = dict.fromkeys((*ASSET_FIELDS, *COMPARISON_FIELDS.get(name, ())))
            changed = [k for k in fields if ran_with.get(k) != profile.get(k)]
        if changed:
            print(f"[bench] dropping {name} from the last run: measured with a different {', '.join(changed)}; "
                  f"re-run it with --only {name}", flush=True)
        else:
            kept[name] = result
    return kept


def main(argv=None) -> int:
    from bench.profiles import PROFILES
    from bench.report import machine, render

    args = parse_args(argv)
    profile = "quick" if args.quick else "full"
    output_dir = args.output_dir or (os.path.join(HERE, "results", "quick") if args.quick else HERE)
    report = args.report or (os.path.join(output_dir, "BENCHMARKS.md") if args.quick else
                             os.path.join(os.path.dirname(HERE), "BENCHMARKS.md"))
    figures_dir = os.path.join(output_dir, "figures")
    os.makedirs(figures_dir, exist_ok=True)
    started, t0 = datetime.datetime.now().isoformat(timespec="seconds"), time.perf_counter()
    results = {"machine": machine(), "profile": PROFILES[profile].as_dict(), "started": started,
               "results_json": os.path.join(output_dir, "results.json"), "comparisons": {}}
    assets = _worker("assets", args, profile, figures_dir)
    if "error" in assets:
        print(f"[bench] could not build the benchmark's data and model: {assets['error']}", file=sys.stderr)
        return 1
    results["build"] = assets["build"]
    # --only re-runs some comparisons and keeps the others' results from the last run, each if its
    # own profile fields and the backbone are unchanged
    previous = _previous(results["results_json"], results["profile"], results["build"],
                         args.only) if args.only else {}
    results["comparisons"] = {name: previous[name] for name in COMPARISONS if name in previous}
    for name in args.only or list(COMPARISONS):
        results["comparisons"][name] = _worker(name, args, profile, figures_dir)
        results["comparisons"][name]["profile"] = results["profile"]  # what it ran with, for a later --only
    results["comparisons"] = {name: results["comparisons"][name] for name in COMPARISONS
                              if name in results["comparisons"]}
    results["wall_seconds"] = time.perf_counter() - t0
    # what a fresh run costs: building the inputs (when not cached) plus every comparison
    results["total_seconds"] = sum(results["build"]["seconds"].values()) + sum(
        r.get("wall_seconds", 0) for r in results["comparisons"].values())
    # replaced, never rewritten in place: a run killed here leaves the last complete results, which
    # the next --only run keeps comparisons from
    write_json_atomic(Path(results["results_json"]), results, indent=1)
    write_text_atomic(Path(report), render(results, report))
    failed = [n for n, r in results["comparisons"].items() if "error" in r]
    print(f"[bench] wrote {report} and {results['results_json']} in {results['wall_seconds'] / 60:.1f} min"
          + (f"; FAILED: {failed}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
