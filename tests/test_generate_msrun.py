"""infer/generate.py under msrun on the CPU: 2 workers together write exactly the images 1 worker writes
(same files, same pixels), each rank its own records, and rank 0 prints the total."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import FIXTURES
from tests.test_train_msrun import free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "infer" / "generate.py"
sys.path.insert(0, str(SCRIPT.parent))
import generate  # noqa: E402

PROMPTS = ["a red circle", "a blue square", "two green triangles"]


@pytest.mark.skipif(shutil.which("msrun", path=os.path.dirname(sys.executable)) is None, reason="no msrun")
def test_two_workers_write_the_images_of_one(tmp_path):
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    args = ["--model", str(FIXTURES / "pipeline" / "tiny_flux"), "--prompt_file", str(tmp_path / "prompts.txt"),
            "--num_images", "2", "--seed", "3", "--steps", "2", "--height", "32", "--width", "32",
            "--max_sequence_length", "16", "--device", "cpu", "--mode", "pynative"]
    env = dict(os.environ, GLOG_v="3", PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    msrun = [os.path.join(os.path.dirname(sys.executable), "msrun"), "--worker_num=2", "--local_worker_num=2",
             f"--master_port={free_port()}", "--join=True", f"--log_dir={tmp_path / 'logs'}"]
    two = subprocess.run(msrun + [str(SCRIPT), *args, "--output_dir", str(tmp_path / "two")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    logs = {p.name: p.read_text(errors="replace") for p in (tmp_path / "logs").glob("worker_*.log")}
    assert two.returncode == 0, (two.stdout[-2000:], {k: v[-2000:] for k, v in logs.items()})
    assert generate.main(args + ["--output_dir", str(tmp_path / "one")]) == 0  # one process: this one

    names = sorted(p.name for p in (tmp_path / "one").glob("*.png"))
    assert names == [f"{i:03d}_seed{3 + i % 2}.png" for i in range(6)]
    assert sorted(p.name for p in (tmp_path / "two").glob("*.png")) == names
    for name in names:
        a, b = (np.asarray(Image.open(tmp_path / d / name).convert("RGB")) for d in ("one", "two"))
        assert np.array_equal(a, b), name

    # each rank made every other image, and wrote one record per image
    records = {rank: [json.loads(line) for line in open(tmp_path / "two" / f"images.rank{rank}.jsonl")]
               for rank in (0, 1)}
    assert [r["file"] for r in records[0]] == names[0::2] and [r["file"] for r in records[1]] == names[1::2]
    assert [(r["prompt"], r["seed"]) for r in records[1]] == [("a red circle", 4), ("a blue square", 4),
                                                              ("two green triangles", 4)]
    assert all(r["seconds"] > 0 for rank in records for r in records[rank])
    single = [json.loads(line) for line in open(tmp_path / "one" / "images.jsonl")]
    assert [r["file"] for r in single] == names
    assert "6 images in" in logs["worker_0.log"] and "images/s (2 processes)" in logs["worker_0.log"]
    assert "images/s" not in logs["worker_1.log"]
