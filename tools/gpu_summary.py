"""Summary table of a GPU check (tools/gpu_check.sh): benchmark results against the targets
of issue 13 and the cuda-marked test counts.

    python tools/gpu_summary.py RESULTS.json [TESTS.xml]
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

#: (label, benchmark name prefix, impl or None, extra_info key, comparison, target)
R, F, O, M = (
    "test_reactivate_craft[cuda-iresnet",
    "test_filter_stats_r100_every_conv[cuda",
    "test_optimizer_step[craft-cuda",
    "test_feature_map_stats[cuda-B100-C64",
)
TARGETS = [
    ("reactivate_ craft [64,3,3,3] vs naive", R, "cuda", "speedup_vs_naive", ">=", 50.0),
    ("  same, Triton", R, "triton", "speedup_vs_naive", ">=", 50.0),
    ("filter_stats, every r100 conv: HBM fraction", F, "cuda", "fraction_of_peak", ">=", 0.8),
    ("  same, Triton", F, "triton", "fraction_of_peak", ">=", 0.8),
    ("ReactivatingSGD step (interval=1) / SGD fused, r50", O, None, "ratio_vs_sgd", "<=", 1.05),
    ("feature_map_stats B100 C64 112^2 vs naive", M, "triton", "speedup_vs_naive", ">=", 5.0),
    ("  same: HBM fraction (read-once bound 2x: 0.5)", M, "triton", "fraction_of_peak", ">=", 0.5),
    (
        "folded filter_stats / weight-only, r50 conv",
        "test_filter_stats_folded[cuda-r50",
        "cuda",
        "ratio_vs_weight_only",
        "<=",
        1.10,
    ),
    (
        "BN-aware reactivate_ / weight-only, conv1",
        "test_reactivate_craft_bn_aware[cuda-iresnet",
        "cuda",
        "ratio_vs_weight_only",
        "<=",
        1.5,
    ),
]


def _find(benchmarks: list[dict[str, Any]], name: str, impl: str | None) -> dict | None:
    for b in benchmarks:
        info = b.get("extra_info", {})
        if name in b["name"] and (impl is None or info.get("impl") == impl):
            return info
    return None


def summary(results: Path, tests: Path | None) -> str:
    data = json.loads(results.read_text()) if results.is_file() else {"benchmarks": []}
    mi = data.get("machine_info", {})
    lines = [
        f"device {mi.get('cuda_device', '?')}, torch {mi.get('torch', '?')}, "
        f"CUDA {mi.get('cuda', '?')}, Triton {mi.get('triton', '?')}, "
        f"extension loaded {mi.get('craft_ext_extension_loaded', '?')}",
        "",
        f"{'target':<52} {'measured':>10} {'target':>9}  result",
    ]
    for label, name, impl, key, cmp, target in TARGETS:
        info = _find(data.get("benchmarks", []), name, impl)
        value = None if info is None else info.get(key)
        if value is None:
            lines.append(f"{label:<52} {'-':>10} {cmp + str(target):>9}  not run")
            continue
        ok = value >= target if cmp == ">=" else value <= target
        lines.append(
            f"{label:<52} {value:>10.3g} {cmp + str(target):>9}  {'MET' if ok else 'MISSED'}"
        )
    if tests is not None and tests.is_file():
        root = ET.parse(tests).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        if suite is not None:
            lines += [
                "",
                f"cuda tests: {suite.get('tests')} run, {suite.get('failures')} failed, "
                f"{suite.get('errors')} errors, {suite.get('skipped')} skipped",
            ]
            for case in suite.iter("testcase"):
                if case.find("failure") is not None or case.find("error") is not None:
                    lines.append(f"  FAILED {case.get('classname')}::{case.get('name')}")
    return "\n".join(lines)


if __name__ == "__main__":
    args = [Path(a) for a in sys.argv[1:]]
    if not args:
        print(__doc__, file=sys.stderr)
        raise SystemExit(2)
    print(summary(args[0], args[1] if len(args) > 1 else None))
