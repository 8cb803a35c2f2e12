"""python -m mindflux.check_device on the CPU: the report, the exit status, timeouts and a missing device.

The op-parity stages run here (about 25 s); the transformer, LoRA step, generate and msrun stages take
5 minutes on 2 cores together, so the suite leaves them to the command itself (docs/install.md).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mindflux.check_device import StageResult, format_table, run_stages
from mindflux.check_device.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), GLOG_v="3")


def test_cpu_check_passes_every_stage_and_writes_the_report(tmp_path):
    report = tmp_path / "r.json"
    done = subprocess.run([sys.executable, "-m", "mindflux.check_device", "--device", "cpu", "--json", str(report),
                           "--stages", "versions,run_check,attention,vae_attention,norms_conv,msrun"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads(report.read_text())
    assert data["device"] == "CPU" and data["versions"]["mindspore"] and data["versions"]["dtype"] == "float32"
    stages = {s["name"]: s for s in data["stages"]}
    assert list(stages) == ["versions", "run_check", "attention", "vae_attention", "norms_conv", "msrun"]
    for name in ("versions", "run_check", "attention", "vae_attention", "norms_conv"):
        assert stages[name]["status"] == "pass", stages[name]
        assert isinstance(stages[name]["seconds"], float)
    # parity details carry measured errors far inside the fp32 bound
    assert "math fwd" in stages["attention"]["detail"] and "Conv2d" in stages["norms_conv"]["detail"]
    assert stages["msrun"]["status"] == "skip" and "--msrun 2" in stages["msrun"]["detail"]
    assert "no stage failed" in done.stdout


def test_a_stage_past_its_timeout_fails_and_the_rest_still_run():
    info, results = run_stages("cpu", ["vae_attention", "versions"], timeouts={"vae_attention": 0.01},
                               echo=lambda r: None)
    assert [(r.name, r.status) for r in results] == [("vae_attention", "fail"), ("versions", "pass")]
    assert "timed out after" in results[0].detail
    assert info["device"] == "CPU"
    table = format_table(results + [StageResult("msrun", "skip", "why", 0.0)])
    assert "vae_attention  fail" in table and "msrun" in table


def test_a_missing_device_is_refused_at_once_with_its_name(capsys):
    assert main(["--device", "ascend"]) == 2  # this machine has no Ascend plugin
    err = capsys.readouterr().err
    assert "--device ascend" in err and "install" in err and "--device cpu" in err


def test_unknown_stage_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--stages", "versions,warp"])
    assert exit_info.value.code == 2 and "warp" in capsys.readouterr().err
