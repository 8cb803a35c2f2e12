"""Data parallel under msrun on the CPU: 2 workers x batch 1 make the same LoRA as 1 worker x batch 2.

Both runs are graph mode, fp32, with per-step flips and caption drops, so the data order, the
per-sample draws and the split of the global batch must all line up. Measured after 3 updates
(lr 1e-2, weights up to 0.9): the LoRAs differ by 1.0e-6 (batch-1 and batch-2 matmuls round
differently); the threshold is the issue's 1e-5.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mindflux.safetensors_io import load_file
from tests.tiny_flux import make_images, make_model_folder

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "train" / "train_dreambooth_lora_flux.py"
STEPS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("msrun", path=os.path.dirname(sys.executable)) is None, reason="no msrun")
def test_two_workers_match_one_worker_with_the_whole_batch(tmp_path):
    make_model_folder(tmp_path / "model")
    make_images(tmp_path / "instance", count=4, size=40)
    args = ["--pretrained_model_name_or_path", str(tmp_path / "model"), "--instance_data_dir",
            str(tmp_path / "instance"), "--instance_prompt", "sks", "--resolution", "32", "--device", "cpu",
            "--mode", "graph", "--seed", "0", "--learning_rate", "1e-2", "--max_sequence_length", "8",
            "--report_to", "none", "--max_train_steps", str(STEPS), "--random_flip", "--caption_dropout", "0.3"]
    # msrun starts `python <script>`: the interpreter running the tests must come first on PATH
    env = dict(os.environ, GLOG_v="3", PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    msrun = [os.path.join(os.path.dirname(sys.executable), "msrun"), "--worker_num=2", "--local_worker_num=2",
             f"--master_port={free_port()}", "--join=True", f"--log_dir={tmp_path / 'msrun_logs'}"]
    # the two runs are independent: started together, the single process's compile (mostly one thread)
    # overlaps the workers' instead of following them; their output goes to files (a full pipe would block)
    with open(tmp_path / "two.out", "w") as two_out, open(tmp_path / "one.err", "w") as one_err:
        two = subprocess.Popen(msrun + [str(SCRIPT)] + args + ["--train_batch_size", "1", "--output_dir",
                                                               str(tmp_path / "two")],
                               cwd=ROOT, env=env, stdout=two_out, stderr=subprocess.STDOUT)
        one = subprocess.Popen([sys.executable, str(SCRIPT)] + args + ["--train_batch_size", "2", "--output_dir",
                                                                       str(tmp_path / "one")],
                               cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=one_err)
        try:
            two.wait(timeout=300)
            one.wait(timeout=300)
        finally:
            for process in (two, one):
                if process.poll() is None:
                    process.kill()
                    process.wait()
    logs = {p.name: p.read_text(errors="replace")[-3000:] for p in (tmp_path / "msrun_logs").glob("worker_*.log")}
    assert two.returncode == 0, ((tmp_path / "two.out").read_text(errors="replace")[-2000:], logs)
    assert one.returncode == 0, (tmp_path / "one.err").read_text(errors="replace")[-3000:]

    a, b = (load_file(str(tmp_path / d / "pytorch_lora_weights.safetensors")) for d in ("one", "two"))
    error = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    moved = max(float(np.abs(a[k]).max()) for k in a if ".lora_B." in k)
    assert error <= 1e-5 and moved > 1e-2, (error, moved)
    # only rank 0 wrote: one log line per update, and rank 1 saved nothing
    steps = [json.loads(line) for line in open(tmp_path / "two" / "logs" / "train_log.jsonl") if '"loss"' in line]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    assert "Saved the LoRA weights" in logs["worker_0.log"] and "Saved the LoRA weights" not in logs["worker_1.log"]
    assert "2 process(es)" in logs["worker_1.log"] or "2 process(es)" in logs["worker_0.log"]
