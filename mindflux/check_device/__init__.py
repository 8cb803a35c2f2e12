"""`python -m mindflux.check_device`: confirm the port on this machine's device in minutes.

    python -m mindflux.check_device                      # the best device found (Ascend, GPU, else CPU)
    python -m mindflux.check_device --device ascend --json report.json
    python -m mindflux.check_device --msrun 2            # also the two-worker data-parallel check

Each stage (see stages.py) reports pass / fail / skip with a detail and its seconds. The stages run
in one worker process that this runner watches: a stage that passes its timeout, or crashes the
process (a kernel fault ends it without a Python exception), is reported as failed and the
remaining stages continue in a fresh worker. The exit status is 0 when no stage failed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# name -> timeout in seconds (the device sizes; the CPU uses smaller shapes, see stages.py)
STAGES = {
    "versions": 120,
    "run_check": 120,
    "attention": 420,
    "vae_attention": 300,
    "norms_conv": 180,
    "transformer": 600,
    "lora_step": 600,
    "generate": 600,
    "msrun": 600,
}


@dataclass
class StageResult:
    name: str
    status: str  # "pass" | "fail" | "skip"
    detail: str
    seconds: float


def _worker_env() -> dict[str, str]:
    """The worker imports this same mindflux, wherever it was imported from."""
    root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH", "")
    return dict(os.environ, PYTHONPATH=root + (os.pathsep + path if path else ""), GLOG_v=os.environ.get("GLOG_v", "3"))


def _read_events(path: str) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.endswith("\n")]
    except FileNotFoundError:
        return []


def _tail(path: str, chars: int = 600) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return " ".join(text[-chars:].split())


class DeviceUnavailable(RuntimeError):
    """The requested device cannot be used: the message says what is missing."""


def _check_device_present(device: str) -> None:
    """Refuse at once, before any worker starts, when the asked-for device cannot be used (the message says what
    is missing and how to install it)."""
    from ..device import resolve_device

    try:
        resolve_device(device)
    except (ValueError, OSError) as err:
        raise DeviceUnavailable(f"{err} (or check on the CPU with --device cpu)") from None


def run_stages(device: str, names: list[str], msrun: int = 0, timeouts: dict[str, float] | None = None,
               echo=print) -> tuple[dict, list[StageResult]]:
    """Run `names` in order in watched worker processes; returns ({"device", "versions"}, results)."""
    _check_device_present(device)
    timeouts = dict(STAGES, **(timeouts or {}))
    info: dict = {"device": device, "versions": {}}
    results: list[StageResult] = []
    remaining = list(names)
    with tempfile.TemporaryDirectory(prefix="mindflux_check_") as tmp:
        attempt = 0
        while remaining:
            attempt += 1
            events_path, log_path = os.path.join(tmp, f"events{attempt}.jsonl"), os.path.join(tmp, f"log{attempt}")
            cmd = [sys.executable, "-m", "mindflux.check_device", "--device", device, "--msrun", str(msrun),
                   "--stages", ",".join(remaining), "--_events", events_path, "--_workdir", tmp]
            with open(log_path, "w") as log:
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_worker_env())
            seen, current, started, killed = 0, None, time.monotonic(), None
            while True:
                done = proc.poll() is not None
                events = _read_events(events_path)
                for event in events[seen:]:
                    if "fatal" in event:
                        proc.wait()
                        raise DeviceUnavailable(event["fatal"])
                    if "device" in event:
                        info.update(event)
                    elif "start" in event:
                        current, started = event["start"], time.monotonic()
                    elif "result" in event:
                        result = StageResult(**event["result"])
                        if result.seconds > timeouts[result.name]:  # it finished between two polls, but too late
                            result = StageResult(result.name, "fail", f"timed out after {timeouts[result.name]:g} s "
                                                 f"(took {result.seconds:.2f} s)", result.seconds)
                        results.append(result)
                        remaining.remove(result.name)
                        echo(result)
                        current = None
                seen = len(events)
                if done:
                    break
                if current is not None and time.monotonic() - started > timeouts[current]:
                    proc.kill()
                    proc.wait()
                    killed = current
                    break
                time.sleep(0.2)
            if not remaining:
                break
            # the worker ended (or was ended) before reporting every stage: the one it was in failed
            name = killed or current or remaining[0]
            if killed:
                detail = f"timed out after {timeouts[name]:.0f} s"
            else:
                detail = f"the worker process ended with status {proc.returncode} during this stage: {_tail(log_path)}"
            result = StageResult(name, "fail", detail, round(time.monotonic() - started, 2))
            results.append(result)
            remaining.remove(name)
            echo(result)
    return info, results


def format_table(results: list[StageResult]) -> str:
    width = max([len(r.name) for r in results] + [5])
    lines = [f"{'stage':<{width}}  status  seconds  detail"]
    lines += [f"{r.name:<{width}}  {r.status:<6}  {r.seconds:7.1f}  {r.detail}" for r in results]
    return "\n".join(lines)


def write_json(path: str, info: dict, results: list[StageResult]) -> None:
    report = {"device": info.get("device"), "versions": info.get("versions", {}),
              "stages": [asdict(r) for r in results]}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
