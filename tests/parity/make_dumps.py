"""Regenerate the PyTorch reference fixtures under tests/fixtures/ (dev only: `pip install -e .[torch]`).

    python tests/parity/make_dumps.py               # every topic
    python tests/parity/make_dumps.py transformer   # some topics
    python tests/parity/make_dumps.py --check       # regenerate into a temporary folder and compare
    MINDSPORE_PYTHON=.venv/bin/python /work/tvenv/bin/python tests/parity/make_dumps.py pipeline  # two venvs

Each topic is a list of stages. A "torch" stage runs diffusers / transformers / peft; a
"mindspore" stage writes files with mindflux that a later torch stage loads (interop both
ways). Every stage runs in its own process, so torch and MindSpore never share one.
The tests read only the files written here; they never import torch.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"

# topic -> [(runtime, "module:function")]; modules live beside this file.
TOPICS: dict[str, list[tuple[str, str]]] = {
    "transformer": [
        ("torch", "dump_transformer:make_reference"),
        ("mindspore", "dump_transformer:write_mindflux_copy"),
        ("torch", "dump_transformer:load_mindflux_copy"),
    ],
    "vae": [("torch", "dump_vae:make_reference")],
    "scheduler": [("torch", "dump_scheduler:make_reference")],
    # tokenizers before text_encoders: the encoders' cases are tokenized with these folders
    "tokenizers": [
        ("torch", "dump_text_encoders:make_tokenizers"),
    ],
    "text_encoders": [
        ("torch", "dump_text_encoders:make_reference"),
        ("mindspore", "dump_text_encoders:write_mindflux_copy"),
        ("torch", "dump_text_encoders:load_mindflux_copy"),
    ],
    "lora": [
        ("torch", "dump_lora:make_reference"),
        ("mindspore", "dump_lora:write_mindflux_files"),
        ("torch", "dump_lora:load_mindflux_files"),
    ],
    "train_step": [("torch", "dump_train_step:make_reference")],
    "train_batch": [("torch", "dump_train_batch:make_reference")],
    # after train_step and train_batch (their settings and images); the mindspore stage writes a mindflux file
    "train_kontext": [
        ("torch", "dump_train_kontext:make_reference"),
        ("mindspore", "dump_train_kontext:write_mindflux_lora"),
        ("torch", "dump_train_kontext:load_mindflux_lora"),
    ],
    # after tokenizers: the pipeline's tokenizer folders are saved from these
    # after transformer: fp8 and GGUF files of its flux_dev model
    "sources": [("torch", "dump_sources:make_reference")],
    "lora_formats": [("torch", "dump_lora_formats:make_reference")],
    "pipeline": [
        ("torch", "dump_pipeline:make_reference"),
        ("mindspore", "dump_pipeline:write_mindflux_copy"),
        ("torch", "dump_pipeline:load_mindflux_copy"),
    ],
    # after pipeline: runs its tiny_flux folder with diffusers' FirstBlockCacheConfig
    "cache": [("torch", "dump_cache:make_reference")],
    # after pipeline: the family pipelines use its tiny_flux folder
    "pipelines": [("torch", "dump_pipelines:make_reference")],
}


def run_stage(spec: str, out: Path) -> None:
    module_name, func = spec.split(":")
    sys.path.insert(0, str(ROOT))
    module = importlib.import_module(f"tests.parity.{module_name}")
    getattr(module, func)(out)


def generate(topics: list[str], root: Path) -> None:
    for topic in topics:
        out = root / topic
        out.mkdir(parents=True, exist_ok=True)
        for runtime, spec in TOPICS[topic]:
            print(f"[{topic}] {runtime}: {spec}", flush=True)
            env = dict(os.environ, PYTHONHASHSEED="0", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", GLOG_v="3")
            # TORCH_PYTHON / MINDSPORE_PYTHON: the interpreter of each runtime, where no one venv has both
            python = os.environ.get(f"{runtime.upper()}_PYTHON", sys.executable)
            command = [python, __file__, "--stage", spec, "--out", str(out)]
            subprocess.run(command, check=True, env=env, cwd=ROOT)


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): _content_hash(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _content_hash(path: Path) -> str:
    """sha256 of a file; for safetensors, of its header (keys sorted) and tensor bytes (names sorted).

    The Rust safetensors writer that torch-side libraries use emits metadata keys in hash order,
    which differs from run to run although the content is the same."""
    data = path.read_bytes()
    if path.suffix != ".safetensors":
        return hashlib.sha256(data).hexdigest()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    body = data[8 + size:]
    h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for name in sorted(k for k in header if k != "__metadata__"):
        begin, end = header[name]["data_offsets"]
        h.update(body[begin:end])
    return h.hexdigest()


# Another CPU rounds torch's and MindSpore's float sums differently (measured on two machines: up to 2e-5 on
# gradients and 7e-5 on weights after Adam steps, relative to each tensor's largest entry); identical bytes
# are only expected on the machine that wrote the fixtures.
CHECK_RTOL = 1e-4


def _float_difference(old: Path, new: Path) -> float | None:
    """Largest |old - new| / max|old| over the tensors of two safetensors files with the same keys, shapes
    and dtypes; None when they are not such a pair or a non-float tensor differs."""
    if old.suffix != ".safetensors" or not new.exists():
        return None
    import numpy as np
    from safetensors.numpy import load_file

    try:
        a, b = load_file(old), load_file(new)
    except Exception:  # e.g. BF16 without a numpy dtype for it: compare those by bytes only
        return None
    if set(a) != set(b) or any(a[k].shape != b[k].shape or a[k].dtype != b[k].dtype for k in a):
        return None
    worst = 0.0
    for key in a:
        if not np.issubdtype(a[key].dtype, np.floating):
            if not np.array_equal(a[key], b[key]):
                return None
        elif a[key].size:
            x, y = a[key].astype(np.float64), b[key].astype(np.float64)
            worst = max(worst, float(np.abs(x - y).max() / max(np.abs(x).max(), 1e-30)))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("topics", nargs="*", help=f"topics to regenerate (default: all of {', '.join(TOPICS)})")
    parser.add_argument("--check", action="store_true", help="regenerate into a temporary folder and compare")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        run_stage(args.stage, Path(args.out))
        return
    topics = args.topics or list(TOPICS)
    unknown = [t for t in topics if t not in TOPICS]
    if unknown:
        parser.error(f"unknown topics {unknown}; known: {list(TOPICS)}")
    if not args.check:
        for topic in topics:
            shutil.rmtree(FIXTURES / topic, ignore_errors=True)
        generate(topics, FIXTURES)
        return
    with tempfile.TemporaryDirectory() as tmp:
        generate(topics, Path(tmp))
        differ, rounding = [], []
        for topic in topics:
            old, new = digest(FIXTURES / topic), digest(Path(tmp) / topic)
            for name in sorted(set(old) | set(new)):
                if old.get(name) == new.get(name):
                    continue
                worst = _float_difference(FIXTURES / topic / name, Path(tmp) / topic / name)
                if worst is None or worst > CHECK_RTOL:
                    differ.append(f"{topic}/{name}" + ("" if worst is None else f" (worst {worst:.1e})"))
                else:
                    rounding.append(f"{topic}/{name} (worst {worst:.1e})")
        if rounding:
            print(f"equal up to float rounding (within {CHECK_RTOL:g} of each tensor's largest entry):\n  "
                  + "\n  ".join(rounding))
        if differ:
            sys.exit("regenerated fixtures differ from the committed ones:\n  " + "\n  ".join(differ))
        print(f"all fixtures of {', '.join(topics)} reproduce")


if __name__ == "__main__":
    main()
