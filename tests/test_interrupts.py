"""mindflux.interrupts with real signals sent to a child process that has run (and keeps compiling) MindSpore
graphs, which replaces the process's signal handlers (measured: without the guard the child ends with -15)."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent("""
    import signal, sys, time
    use_guard = sys.argv[1] == "guard"  # "plain": without it (exits -15 on MindSpore 2.7.1)
    if use_guard:  # as the CLIs do: blocked before MindSpore starts any thread
        signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGINT, signal.SIGTERM))
    import mindspore as ms
    from mindspore import nn
    from mindflux.interrupts import exit_code, interrupt_guard

    class Double(nn.Cell):
        def construct(self, x):
            return x * 2

    def work():
        ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
        cell = Double()
        cell(ms.Tensor([1.0]))
        print("ready", flush=True)
        for n in range(2, 2000):  # a new input shape: a new graph compile every step
            cell(ms.Tensor([1.0] * n))
            time.sleep(0.01)

    if use_guard:
        with interrupt_guard("child"):
            try:
                work()
            except KeyboardInterrupt as err:
                print("stopped cleanly", file=sys.stderr)
                sys.exit(exit_code(err))
    else:
        try:
            work()
        except KeyboardInterrupt:
            sys.exit(130)
""")


def run_child(tmp_path, mode: str, signum: int) -> tuple[int, str]:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    child = subprocess.Popen([sys.executable, str(script), mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=dict(os.environ, PYTHONPATH=str(ROOT), GLOG_v="3"))
    try:
        assert child.stdout.readline().strip() == "ready"
        child.send_signal(signum)
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    return child.returncode, err


def test_a_sigterm_after_graph_compiles_raises_in_python(tmp_path):
    """SIGTERM ends with 143 and a Python exception (SIGINT: test_safety_train.py, through the training script).
    Measured without the guard: the same child ends with status -15 and no Python handler runs."""
    rc, err = run_child(tmp_path, "guard", signal.SIGTERM)
    assert rc == 143 and "stopped cleanly" in err and "Traceback" not in err, err
