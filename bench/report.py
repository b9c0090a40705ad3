"""``BENCHMARKS.md`` from the collected results: the machine, the commands to reproduce, the
headline ratios, then each comparison's tables and figures. Pure formatting: every number comes
from ``results.json``."""

from __future__ import annotations

import os
import platform
from typing import Any

from bench.profiles import COMPARISON_FIELDS


def machine() -> dict[str, Any]:
    """CPU model, cores, memory, OS, Python and library versions of the machine that ran the bench."""
    import importlib.metadata as md

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = None
    try:
        with open("/proc/meminfo") as f:
            memory = round(int(next(line.split()[1] for line in f if line.startswith("MemTotal"))) / 2 ** 20, 1)
    except (OSError, StopIteration):
        pass
    versions = {}
    for name in ("tensorflow", "tf-keras", "tensorflow-hub", "saliency", "numpy", "fastapi", "uvicorn"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = "not installed"
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "memory_gib": memory, "os": platform.platform(), "python": platform.python_version(),
            "gpu": "none used (CPU only)" if not os.environ.get("CUDA_VISIBLE_DEVICES") else
            os.environ["CUDA_VISIBLE_DEVICES"], "versions": versions}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:
            return "n/a"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)


def network_label(results: dict) -> str:
    """The network every figure was measured on, from the build info (one place)."""
    backbone = (results.get("build") or {}).get("backbone") or {}
    params = backbone.get("parameters")
    return (f"MobileNetV2 1.0 @ 192 ({params:,} parameters, {backbone.get('feature_dim')}-d features)"
            if params else "MobileNetV2 1.0 @ 192 (2,257,984 parameters, 1280-d features)")


def _machine_label(m: dict) -> str:
    return f"{m['cpu']}, {m['cores']} cores"


def _table(t: dict, context: str = "") -> list[str]:
    lines = [f"**{t['caption']}**" + (f" _({context})_" if context else ""), "",
             "| " + " | ".join(t["columns"]) + " |",
             "|" + "|".join(" --- " for _ in t["columns"]) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in t["rows"]]
    return lines + [""]


def render(results: dict, report_path: str) -> str:
    """The markdown text; figure links are relative to ``report_path``."""
    m, profile = results["machine"], results["profile"]
    base = os.path.dirname(os.path.abspath(report_path))
    network, where = network_label(results), _machine_label(m)
    context = f"{network}; {where}"
    lines = ["# Benchmarks", "",
             "Written by `make bench` (`python -m bench`). Every comparison ran in its own process, against its "
             "reference in the same run, contenders alternating; raw figures are in "
             f"`{os.path.relpath(results['results_json'], base)}`.", "",
             f"**Network:** {network}, the offline build of TF Hub's `mobilenet_v2_100_192/feature_vector` "
             f"architecture, with a 5-class softmax head. **Machine:** {where}. **Profile:** `{profile['name']}`.",
             ""]
    headline = {k: v for r in results["comparisons"].values() if "headline" in r for k, v in r["headline"].items()}
    if headline:
        lines += ["## Headline figures", "", f"_{context}_", "", "| figure | value |", "| --- | --- |"]
        lines += [f"| {k} | {'>= ' if 'lower bound' in k else ''}{_fmt(v)}{'x' if 'speed-up' in k else ''} |"
                  for k, v in headline.items()]
        lines += [""]
    lines += ["## Machine", "",
              f"- CPU: {m['cpu']}, {m['cores']} cores available to the run; memory {m['memory_gib']} GiB; "
              f"GPU: {m['gpu']}",
              f"- {m['os']}, Python {m['python']}",
              "- " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
              f"- profile `{profile['name']}`; last started {results['started']}; building the inputs plus every "
              f"comparison: {results.get('total_seconds', results['wall_seconds']) / 60:.1f} min", "",
              "## Reproduce", "", "```bash",
              "make bench                      # = PYTHONPATH=. python -m bench (full profile, writes this file)",
              "python -m bench --only ig_speed # one comparison; --quick for the smoke-test sizes",
              "```", "",
              "The backbone is the one cached build under `models/backbone` that the demo and the tests share "
              "(`trainer.backbone.ensure_backbone`, rebuilt only when its recipe changes). The data (synthetic "
              "flowers with masks) and the trained, exported classifier are cached under "
              "`bench/.cache/<profile>/`; delete it to rebuild.", ""]
    build = results.get("build")
    if build:
        backbone = build.get("backbone") or {}
        recipe = backbone.get("recipe") or {}
        secs = build.get("seconds", {})
        lines += [f"Backbone: {backbone.get('dir', '?')}, recipe " + ", ".join(f"{k}={v}" for k, v in recipe.items())
                  + (" (reused: the cached build matched)" if backbone.get("reused") else
                     f" (built for this run in {backbone.get('seconds', 0):.0f} s)")
                  + (f"; pre-training validation accuracy {backbone['pretrain_val_accuracy']:.1%}"
                     if backbone.get("pretrain_val_accuracy") is not None else "") + ".", "",
                  ("Data and classifier: reused from the cache" if build.get("reused") else
                   f"Data and classifier built for this run: data {secs.get('data', 0):.0f} s, classifier "
                   f"{secs.get('train', 0):.0f} s, export {secs.get('export', 0):.0f} s")
                  + f"; {profile['num_train']} training and {profile['num_eval']} validation images, "
                  f"{profile['train_epochs']} epochs; the classifier's validation accuracy "
                  f"{build['validation_accuracy']:.1%}.", ""]
    for name, r in results["comparisons"].items():
        if "error" in r:
            lines += [f"## {name}", "", f"Failed: `{r['error']}`", ""]
            continue
        if "skipped" in r:
            lines += [f"## {name}", "", f"Skipped: {r['skipped']}", ""]
            continue
        lines += [f"## {r['title']}", "", r.get("description", ""), ""]
        sizes = ", ".join(f"{k}={profile[k]}" for k in COMPARISON_FIELDS.get(name, ()) if k in profile)
        if sizes:
            lines += [f"Sizes: {sizes}. Network: {network}. Machine: {where}.", ""]
        for t in r.get("tables", []):
            lines += _table(t, context)
        for fig in r.get("figures", []):
            rel = os.path.relpath(fig, base)
            lines += [f"![{os.path.basename(fig)}]({rel})", ""]
        lines += [f"_Wall time of this comparison: {r.get('wall_seconds', 0):.0f} s._", ""]
    return "\n".join(lines)
