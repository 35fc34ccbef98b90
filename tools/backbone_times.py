"""CPU time, memory and store size per image of each backbone dedn extracts with: the table of docs/backbones.md.

A repository tool, not part of the installed package. From the repository root, with dedn importable (installed,
or ``src`` on ``PYTHONPATH``)::

    python tools/backbone_times.py [--batch 4] [--threads N] [--only NAME ...] [--json]
    python tools/backbone_times.py --table-from rows.json   # the table of a saved --json output

Each backbone is measured in a fresh subprocess (so its peak memory is its own): built with random weights
(nothing is downloaded; the timing does not depend on the weights' values), one warm-up image, then one timed
batch of ``--batch`` images at the backbone's size. Columns: the feature map (C x h x w) and regions, parameters,
CPU seconds per image (wall time of the batch's forward pass over its images), the process's peak resident memory
(Python, torch, the network, its weights and one batch's activations), the float16 store's bytes per image
(C * h * w * 2) and what that makes for CUB's 11,788 images.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any

#: (backbone, image size): the registered backbones at their usual sizes and the timm models docs/backbones.md lists.
BACKBONES: list[tuple[str, int]] = [
    ("resnet101", 448),
    ("resnet101", 224),
    ("efficientnet-lite0", 224),
    ("efficientnet-lite0-blocks", 192),
    ("timm:vit_base_patch16_224", 224),
    ("timm:deit_base_patch16_224", 224),
    ("timm:vit_base_patch14_dinov2", 224),
    ("timm:vit_base_patch14_dinov2", 518),
    ("timm:vit_base_patch16_clip_224", 224),
    ("timm:convnext_base", 224),
]


def measure(name: str, size: int, batch: int, threads: int | None) -> dict[str, Any]:
    """Build ``name`` with random weights and time one batch at ``size`` (run in its own process)."""
    import torch

    from dedn.features.backbones import TimmBackbone, get_backbone

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = TimmBackbone(name.removeprefix("timm:")) if name.startswith("timm:") else get_backbone(name, weights=None)
    net(torch.randn(1, 3, size, size))  # warm-up: one-off allocations and kernel choices
    x = torch.randn(batch, 3, size, size)
    start = time.perf_counter()
    out = net(x)
    seconds = time.perf_counter() - start
    c, h, w = (int(s) for s in out.shape[1:])
    return {"backbone": name, "image_size": size, "shape": [c, h, w], "regions": h * w,
            "params_m": sum(p.numel() for p in net.parameters()) / 1e6, "batch": batch,
            "threads": torch.get_num_threads(), "seconds_per_image": seconds / batch,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "store_kb_per_image": c * h * w * 2 / 1024}


def run_all(entries: list[tuple[str, int]], batch: int, threads: int | None) -> list[dict[str, Any]]:
    """Each entry measured in a fresh Python process; a failure is reported in its row."""
    rows = []
    for name, size in entries:
        cmd = [sys.executable, __file__, "--one", name, str(size), "--batch", str(batch)]
        if threads:
            cmd += ["--threads", str(threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            rows.append({"backbone": name, "image_size": size, "error": done.stderr.strip().splitlines()[-1:]})
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table (the CUB column: the store of CUB's 11,788 images, computed from the size)."""
    from dedn.data.benchmarks import BENCHMARKS

    n_cub = BENCHMARKS["CUB"].n_images
    lines = ["| backbone | image | features C x h x w | regions | params | CPU s / image | peak memory | "
             "store / image (float16) | CUB store |", "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| `{r['backbone']}` | {r['image_size']} | failed: {' '.join(r['error'])} ||||||")
            continue
        c, h, w = r["shape"]
        lines.append(f"| `{r['backbone']}` | {r['image_size']} | {c} x {h} x {w} | {r['regions']} | "
                     f"{r['params_m']:.1f} M | {r['seconds_per_image']:.2f} | {r['peak_rss_mb'] / 1024:.2f} GB | "
                     f"{r['store_kb_per_image']:.0f} KB | {r['store_kb_per_image'] * 1024 * n_cub / 1e9:.1f} GB |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4, help="images in the timed batch")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--only", nargs="+", default=None, help="backbone names to measure (default: all listed)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    parser.add_argument("--table-from", default=None, help="print the table of saved --json rows")
    parser.add_argument("--one", nargs=2, metavar=("NAME", "SIZE"), help=argparse.SUPPRESS)  # the subprocess
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error("--batch must be at least 1")
    if args.table_from:
        with open(args.table_from, encoding="utf-8") as f:
            print(table(json.load(f)))
        return 0
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.batch, args.threads)))
        return 0
    entries = [e for e in BACKBONES if args.only is None or e[0] in args.only]
    rows = run_all(entries, args.batch, args.threads)
    print(json.dumps(rows, indent=1) if args.json else table(rows))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
