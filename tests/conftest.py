import os
import sys

import torch

import train_utils as tu  # imports no kernels, so before TRITON_INTERPRET is fine

# Triton reads TRITON_INTERPRET when it is first imported. Set it before any test module imports
# bridge_kernels (model.py does), so that the kernel tests run under the interpreter on machines without
# a GPU, whatever the order of the test files. The model itself stays on the PyTorch path on the CPU
# ("auto" picks Triton only on CUDA).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def process_tree(pid):
    """pid and every process descended from it (Linux: read from /proc)"""
    import glob
    children = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])  # the name, in parentheses, may hold spaces
        except (OSError, IndexError, ValueError):
            continue  # ended meanwhile
        children.setdefault(parent, []).append(int(stat.split("/")[2]))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], []))
    return tree


def kill_after_first_checkpoint(command, run_dir, cwd, timeout=240):
    """Start a training run and SIGKILL it as soon as run_dir/ckpt.pt exists (checkpoints are written to a
    temporary file and renamed, so it is complete), with every process it started (torchrun's workers, which run
    on when their launcher dies; loader workers), as a lost node ends. Returns the step that checkpoint holds."""
    import signal
    import subprocess
    import time
    ckpt = os.path.join(run_dir, "ckpt.pt")
    proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not os.path.exists(ckpt):
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.02)
    tree = process_tree(proc.pid)
    for sig in (signal.SIGSTOP, signal.SIGKILL):  # stopped first: none goes on, or starts another, meanwhile
        for pid in tree:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:  # ended meanwhile
                pass
    proc.wait()
    assert not os.path.exists(os.path.join(run_dir, "final")), "the run finished before it was killed"
    return torch.load(ckpt, weights_only=False)["step"]


def assert_same_final_weights(run_a, run_b):
    from safetensors.torch import load_file
    a, b = (load_file(os.path.join(d, "final", "model.safetensors")) for d in (run_a, run_b))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def run_script(script, args, timeout=300, **kwargs):
    """Run `python script *args` from the project root; fail with its output's tail unless it exits 0."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, script, *args], cwd=root, capture_output=True, text=True, timeout=timeout,
                         **kwargs)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def eval_line(stdout):
    """The fields of a training script's last line, `eval: key=value ...`."""
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("eval: "), last
    return {k: float(v) for k, v in (kv.split("=") for kv in last[len("eval: "):].split())}


def train_lines(run_dir, keys):
    """{step: {key: value}} of the train records in run_dir/metrics.jsonl."""
    import json
    lines = {}
    for line in open(os.path.join(run_dir, "metrics.jsonl")):
        rec = json.loads(line)
        if rec["kind"] == "train":
            lines[rec["step"]] = {k: rec[k] for k in keys}
    return lines


def end_ddp_worker():
    """The last line of an mp.spawn worker that ran a DDP backward: tu.cleanup_distributed(), then os._exit(0),
    which skips the interpreter's shutdown. A gloo thread drops the last backward's all-reduce work a moment after
    the backward has returned, and that work's saved thread-local state holds a Python object (autograd's context),
    so the drop takes the GIL. When the interpreter is already shutting down, taking it ends the thread inside a
    destructor: "terminate called without an active exception", SIGABRT (so a core dump's stack shows). Measured
    on a 2-process script that exits right after its backward: 10 runs in 120 ended so, none in 120 with this
    exit; the DDP tests, which exit milliseconds after theirs, about 1 in 30 (once in CI). The scripts save and
    evaluate for seconds after their last backward."""
    tu.cleanup_distributed()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
