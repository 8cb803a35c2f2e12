"""Checkpoint files (atomic writes, pruning, resolving), data-parallel row split, and the training logs."""

import importlib.util
import json
import os
import struct

import numpy as np
import pytest

from mindflux.training.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint_tensors,
    prune_checkpoints,
    read_state,
    resolve_checkpoint,
    save_checkpoint,
)
from mindflux.training.distributed import rank_rows
from mindflux.training.reporting import TrainingReporter


def write_marker(folder):
    with open(os.path.join(folder, "pytorch_lora_weights.safetensors"), "w") as f:
        f.write("lora")


def save(out, step, limit=None, write_lora=write_marker):
    rng = np.random.default_rng(step)
    state = {"epoch": 0, "position": step, "rng": {"data": rng.bit_generator.state}}
    tensors = {"optimizer/step": np.asarray(step, np.int32), "optimizer/exp_avg.w": np.full((2, 3), step, np.float32)}
    return save_checkpoint(str(out), step, write_lora, tensors, state, limit)


def test_checkpoint_round_trip_and_latest(tmp_path):
    path = save(tmp_path, 10)
    save(tmp_path, 20)
    assert resolve_checkpoint("latest", str(tmp_path)) == str(tmp_path / "checkpoint-20")
    assert resolve_checkpoint("checkpoint-10", str(tmp_path)) == path == resolve_checkpoint(path, "/elsewhere")
    state = read_state(path)
    assert state["global_step"] == 10 and state["position"] == 10
    rng = np.random.default_rng(0)
    rng.bit_generator.state = state["rng"]["data"]  # JSON keeps the generator state exactly
    assert rng.random() == np.random.default_rng(10).random()
    tensors = load_checkpoint_tensors(path)
    assert tensors["optimizer/step"].shape == () and int(tensors["optimizer/step"]) == 10
    np.testing.assert_array_equal(tensors["optimizer/exp_avg.w"], np.full((2, 3), 10, np.float32))


def test_missing_checkpoints_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        resolve_checkpoint("latest", str(tmp_path))
    with pytest.raises(CheckpointError, match="checkpoint-7 does not exist"):
        resolve_checkpoint("checkpoint-7", str(tmp_path))
    (tmp_path / "checkpoint-3").mkdir()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        resolve_checkpoint("checkpoint-3", str(tmp_path))


def test_a_write_that_dies_leaves_the_previous_checkpoint_intact(tmp_path):
    save(tmp_path, 5)
    before = {p: open(os.path.join(tmp_path, "checkpoint-5", p), "rb").read()
              for p in os.listdir(tmp_path / "checkpoint-5")}

    def dies(folder):  # the job is killed after writing part of the new checkpoint
        write_marker(folder)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 6, limit=1, write_lora=dies)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-5"]  # no checkpoint-6, no temporary folder, nothing pruned
    assert {p: open(os.path.join(tmp_path, "checkpoint-5", p), "rb").read() for p in before} == before
    # a temporary folder left by a killed process (no cleanup at all) is never taken for a checkpoint
    (tmp_path / "checkpoint-9.tmp-123").mkdir()
    assert list_checkpoints(str(tmp_path)) == [str(tmp_path / "checkpoint-5")]
    assert resolve_checkpoint("latest", str(tmp_path)).endswith("checkpoint-5")


def test_total_limit_keeps_the_newest(tmp_path):
    for step in (1, 2, 3):
        save(tmp_path, step, limit=2)
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == ["checkpoint-2", "checkpoint-3"]
    save(tmp_path, 10, limit=1)
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == ["checkpoint-10"]
    assert prune_checkpoints(str(tmp_path), 0) == []  # a limit below 1 still keeps the newest


def test_rank_rows_split_the_global_batch():
    assert rank_rows(4, 2, 0).tolist() == [0, 1] and rank_rows(4, 2, 1).tolist() == [2, 3]
    # prior preservation: [instance rows; class rows], each rank keeps its instance then its class rows
    assert rank_rows(2, 2, 1, halves=2).tolist() == [1, 3] and rank_rows(2, 1, 0, halves=2).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="evenly"):
        rank_rows(3, 2, 0)


def read_events(folder):
    """Scalars from TensorBoard event files (TFRecord framing, Event protos)."""
    from tensorboardX.proto import event_pb2

    found = {}
    for name in os.listdir(folder):
        if not name.startswith("events.out"):
            continue
        data = open(os.path.join(folder, name), "rb").read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 16 + length
            for value in event.summary.value:
                found.setdefault(value.tag, []).append((event.step, value.simple_value))
    return found


def test_reporter_writes_json_lines_and_tensorboard(tmp_path):
    tensorboard = importlib.util.find_spec("tensorboardX") is not None  # only the events file needs it
    reporter = TrainingReporter(str(tmp_path), total_steps=3, report_to="tensorboard" if tensorboard else "none",
                                config={"rank": 4})
    for step, loss in ((1, 0.5), (2, 0.25)):
        reporter.log_step(step, 0, loss, 1e-4, 0.1)
    reporter.log_step(3, 0, float("nan"), 1e-4, None)
    reporter.log_images("validation", [np.zeros((4, 4, 3), np.uint8)], 3)
    summary = reporter.summary(3)
    reporter.close()
    assert summary.startswith("training done: 3 steps") and "wall time" in summary and "peak host memory" in summary
    records = [json.loads(line) for line in open(tmp_path / "train_log.jsonl")]
    assert [r.get("step") for r in records] == [1, 2, 3, 3]
    assert records[0]["loss"] == 0.5 and records[2]["loss"] == "nan" and records[3]["event"] == "summary"
    if tensorboard:
        assert read_events(str(tmp_path))["train/loss"] == [(1, 0.5), (2, 0.25)]


def test_reporter_is_silent_off_the_main_process_and_refuses_missing_tensorboard(tmp_path, monkeypatch):
    TrainingReporter(str(tmp_path / "rank1"), 3, enabled=False, report_to="tensorboard").log_step(1, 0, 0.1, 1e-4)
    assert not (tmp_path / "rank1").exists()
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name == "tensorboardX":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ValueError, match=r"needs tensorboardX: pip install mindflux\[tensorboard\]"):
        TrainingReporter(str(tmp_path / "a"), 3, report_to="tensorboard")
    reporter = TrainingReporter(str(tmp_path / "b"), 3, report_to=None)  # the default: a warning, JSON lines only
    reporter.log_step(1, 0, 0.1, 1e-4)
    reporter.close()
    assert (tmp_path / "b" / "train_log.jsonl").is_file() and reporter.writer is None


def test_the_lora_file_keeps_clip_in_fp32_when_the_transformer_is_bf16(tmp_path):
    """export.LoraExport writes through lora.loader.write_lora: the transformer's weights in the run's precision,
    a trained CLIP's in fp32 (as diffusers saves them), scalars in fp32."""
    from mindflux.lora.loader import write_lora
    from mindflux.safetensors_io import SafetensorsFile

    tensors = {"transformer.a.lora_A.weight": np.ones((2, 3), np.float32),
               "text_encoder.q_proj.lora_A.weight": np.ones((2, 3), np.float32),
               "transformer.a.alpha": np.asarray(4.0, np.float32)}
    path = str(tmp_path / "lora.safetensors")
    write_lora(path, tensors, dtype="bf16", fp32_prefixes=("text_encoder.",))
    header = SafetensorsFile(path)
    assert {k: header.dtype(k) for k in header.keys()} == {"transformer.a.lora_A.weight": "BF16",
                                                           "text_encoder.q_proj.lora_A.weight": "F32",
                                                           "transformer.a.alpha": "F32"}
