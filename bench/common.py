"""Shared plumbing for the bench scripts: each framework is timed in its own process."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]

# The bench config: 4 heads of 128, 2 double + 4 single blocks, 1024 image + 128 text tokens.
BENCH_CONFIG = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=128,
                    num_attention_heads=4, joint_attention_dim=512, pooled_projection_dim=128, guidance_embeds=True,
                    axes_dims_rope=[16, 56, 56])
IMAGE_GRID = (32, 32)  # 1024 image tokens
TEXT_LEN = 128
# Untimed calls before timing, for every framework alike: MindSpore's graph-mode steps ran about 1.25x
# slower for the first four or so calls after compiling, then settled (measured on the bench config).
WARMUP = 5


def bench_parser(doc: str, repeat: int = 10) -> argparse.ArgumentParser:
    """The arguments every bench takes: --repeat, and the hidden --child that times one framework."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=repeat)
    parser.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    return parser


def time_calls(fn: Callable[[], object], warmup: int, repeat: int) -> dict:
    """Median and min seconds per call after `warmup` untimed calls (the first includes graph compilation)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return {"first_s": first, "median_s": times[len(times) // 2], "min_s": times[0]}


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(script: str, args: list[str], python: str | None = None) -> dict:
    """Run `script --child ARGS` in a fresh process (of `python`, default this interpreter) and return
    the JSON it prints last."""
    env = dict(os.environ, GLOG_v="3", PYTHONPATH=str(ROOT))
    proc = subprocess.run([python or sys.executable, script, "--child", *args], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def emit(result: dict) -> None:
    print(json.dumps(result))
