"""Issue 15 for training: no stale checkpoint or second run destroys work, Ctrl-C/SIGTERM end cleanly,
nonsense numbers are refused, and the interface shows its defaults (CPU, tiny model)."""

import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mindflux.training.output_dir import LOCK_NAME
from tests.tiny_flux import make_images, make_model_folder, make_prompt_embeds

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "train" / "train_dreambooth_lora_flux.py"
spec = importlib.util.spec_from_file_location("train_dreambooth_lora_flux_safety", SCRIPT)
script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)
LORA = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    make_model_folder(root / "model")
    make_images(root / "instance", count=2, size=40)
    make_prompt_embeds(root / "embeds.safetensors")
    return root


def base_args(root: Path, out: Path) -> list[str]:
    return ["--pretrained_model_name_or_path", str(root / "model"), "--instance_data_dir", str(root / "instance"),
            "--instance_prompt", "a photo of sks thing", "--output_dir", str(out), "--resolution", "32",
            "--device", "cpu", "--mode", "pynative", "--seed", "0", "--learning_rate", "1e-3", "--report_to", "none",
            "--precomputed_prompt_embeds", str(root / "embeds.safetensors"), "--train_batch_size", "1", "--rank", "2"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def last_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    return err.splitlines()[-1]


def test_a_used_folder_is_never_overwritten_and_stale_checkpoints_are_refused(workdir, tmp_path, capsys):
    out = tmp_path / "out"
    args = base_args(workdir, out) + ["--checkpointing_steps", "1"]
    assert script.cli(args + ["--max_train_steps", "2"]) == 0
    first = snapshot(out)
    assert LORA in first and "checkpoint-2/training_state.json" in first and LOCK_NAME not in first
    assert json.loads(first["checkpoint-2/training_state.json"])["run"]["rank"] == 2
    capsys.readouterr()

    # a fresh run into the used folder stops before anything is written
    assert script.cli(args + ["--max_train_steps", "1"]) == 1
    assert "already holds an earlier run's results" in last_error(capsys)
    # "latest" is checkpoint-2, past --max_train_steps 1: it would train 0 steps and overwrite the LoRA
    assert script.cli(args + ["--max_train_steps", "1", "--resume_from_checkpoint", "latest"]) == 1
    message = last_error(capsys)
    assert f"checkpoint {out / 'checkpoint-2'} is at step 2, past --max_train_steps 1" in message
    # a checkpoint of another LoRA shape or data set
    assert script.cli(args + ["--max_train_steps", "3", "--resume_from_checkpoint", "latest", "--rank", "4"]) == 1
    assert "belongs to another run: --rank 2 -> 4" in last_error(capsys)
    other = base_args(workdir, out) + ["--instance_prompt", "another thing"]
    assert script.cli(other + ["--max_train_steps", "3", "--resume_from_checkpoint", "latest"]) == 1
    assert "--instance_prompt 'a photo of sks thing' -> 'another thing'" in last_error(capsys)
    assert snapshot(out) == first  # nothing written, nothing moved

    # --overwrite_output_dir: a fresh run; the earlier files are moved aside, byte for byte
    assert script.cli(args + ["--max_train_steps", "1", "--overwrite_output_dir"]) == 0
    moved = snapshot(out / "previous-1")
    assert {k: v for k, v in first.items() if not k.startswith("logs/")} == \
        {k: v for k, v in moved.items() if not k.startswith("logs/")}
    assert (out / LORA).read_bytes() != first[LORA] and sorted(p.name for p in out.glob("checkpoint-*")) == \
        ["checkpoint-1"]


def test_a_folder_in_use_is_refused_and_a_dead_runs_lock_taken_over(workdir, tmp_path, capsys, caplog, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_NAME).write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename, "started": "x"}))
        assert script.cli(base_args(workdir, out) + ["--max_train_steps", "1"]) == 1
        assert f"--output_dir {out} is in use by another training run (process {holder.pid}" in last_error(capsys)
        assert sorted(os.listdir(out)) == [LOCK_NAME]
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is taken over with a warning, and released at the end. The run also shows
    # that the default --report_to does not warn on a default install (no tensorboardX)
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import fails as when not installed
    args = [a for a in base_args(workdir, out) if a not in ("--report_to", "none")]
    assert script.cli(args + ["--max_train_steps", "1"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [f"{out} was locked by process {holder.pid}, which no longer exists; taking it over"]
    assert (out / "logs" / "train_log.jsonl").is_file()
    assert (out / LORA).is_file() and not (out / LOCK_NAME).exists()


@pytest.mark.parametrize("option, value, message", [
    ("--learning_rate", "0", "--learning_rate must be in (0, inf); got 0"),
    ("--learning_rate", "nan", "--learning_rate must be a finite number; got nan"),
    ("--learning_rate", "inf", "--learning_rate must be a finite number; got inf"),
    ("--lora_dropout", "1.5", "--lora_dropout must be in [0, 1); got 1.5"),
    ("--lora_dropout", "1", "--lora_dropout must be in [0, 1); got 1"),
    ("--lora_alpha", "0", "--lora_alpha must be in (0, inf); got 0"),
    ("--guidance_scale", "nan", "--guidance_scale must be a finite number"),
    ("--adam_beta2", "1", "--adam_beta2 must be in [0, 1); got 1"),
    ("--max_grad_norm", "-1", "--max_grad_norm must be in (0, inf); got -1"),
    ("--seed", "-1", "--seed must be in [0, inf); got -1"),
])
def test_nonsense_numbers_are_refused_naming_the_option(workdir, tmp_path, capsys, option, value, message):
    with pytest.raises(SystemExit) as exit_info:
        script.cli(base_args(workdir, tmp_path / "out") + [option, value])
    assert exit_info.value.code == 2
    assert message in last_error(capsys)
    assert not (tmp_path / "out").exists()


def test_help_shows_every_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        script.parse_args(["--help"])
    parser_help = capsys.readouterr().out
    blocks = parser_help.split("\n  --")[1:]  # one block per option
    options = [b.split()[0] for b in blocks]
    assert len(options) > 80 and "overwrite_output_dir" in options
    assert [o for o, b in zip(options, blocks) if "(default:" not in b] == []
    assert "Beta1 of AdamW and prodigy. (default: 0.9)" in parser_help


def _wait_for(predicate, process, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_a_real_sigint_after_the_first_graph_step_ends_cleanly(workdir, tmp_path):
    """MindSpore replaces the signal handlers when it compiles a graph; the script still stops with 130, one
    line naming the last checkpoint and no traceback (SIGTERM: test_interrupts.py, at less compile cost)."""
    out = tmp_path / "out"
    args = base_args(workdir, out) + ["--mode", "graph", "--max_train_steps", "100000", "--checkpointing_steps", "1",
                                      "--checkpoints_total_limit", "2"]
    child = subprocess.Popen([sys.executable, str(SCRIPT), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        _wait_for(lambda: (out / "checkpoint-2").is_dir(), child, 240)  # past the first graph-mode steps
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("train_dreambooth_lora_flux.py: interrupted; the last checkpoint is"), last
    path = last.split("the last checkpoint is ")[1].split(" (continue")[0]
    assert os.path.isfile(os.path.join(path, "training_state.json"))
    assert not (out / LOCK_NAME).exists()
