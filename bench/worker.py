"""One comparison in its own process: ``python -m bench.worker NAME --profile quick ...``.

A fresh process per comparison keeps one benchmark's traced graphs, thread pools and memory
from colouring the next one's timings. The result (tables, figures, headline ratios, raw
figures) is written as JSON for :mod:`bench.__main__` to collect.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import time

import trainer  # noqa: F401  (legacy Keras before TensorFlow)

#: comparison name -> module with ``run(profile, assets, figures_dir) -> dict``
COMPARISONS = {
    "ig_speed": "bench.ig_speed",
    "ig_maps": "bench.ig_maps",
    "xrai_speed": "bench.xrai_speed",
    "training": "bench.training",
    "serving": "bench.serving_latency",
    "scale": "bench.scale",
    "batch_throughput": "bench.batch_comparison",
    "quality": "bench.quality",
}


def _jsonable(value):
    import numpy as np

    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def main(argv=None) -> None:
    from bench.fixtures import CACHE_DIR, ensure_assets
    from bench.profiles import PROFILES

    parser = argparse.ArgumentParser(prog="python -m bench.worker", description=__doc__)
    parser.add_argument("name", choices=["assets", *COMPARISONS])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="full")
    parser.add_argument("--output_json", required=True)
    parser.add_argument("--figures_dir", required=True)
    parser.add_argument("--cache_dir", default=CACHE_DIR)
    args = parser.parse_args(argv)
    profile = PROFILES[args.profile]
    assets, build = ensure_assets(profile, args.cache_dir)
    if args.name == "assets":
        result = {"build": build}
    else:
        os.makedirs(args.figures_dir, exist_ok=True)
        t0 = time.perf_counter()
        if importlib.util.find_spec(COMPARISONS[args.name]) is None:
            result = {"skipped": f"{COMPARISONS[args.name].replace('.', '/')}.py is not in this tree"}
        else:
            result = importlib.import_module(COMPARISONS[args.name]).run(profile, assets, args.figures_dir)
        result["wall_seconds"] = time.perf_counter() - t0
    with open(args.output_json, "w") as f:
        json.dump(_jsonable(result), f, indent=1)


if __name__ == "__main__":
    main()
