import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One thread per process, for this process and the scripts the tests start: the models are tiny,
# and two OpenMP threads on a machine whose other core is busy (a training run, another test
# process) wait on each other at every small op (measured: the suite took 29 min instead of 6).
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


def present(*objectives):
    """Those of the named objectives this checkout has (objectives.OBJECTIVES): a test
    parametrised with it keeps working when one of them is deleted, as the README promises."""
    from objectives import OBJECTIVES
    return [o for o in objectives if o in OBJECTIVES]


def make_image_folder(root, classes=3, per_class=8, size=16, mode="RGB", seed=0):
    """A tiny ImageFolder: each class a different mean colour plus noise."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        os.makedirs(os.path.join(root, f"class{c}"), exist_ok=True)
        for i in range(per_class):
            shape = (size, size, 3) if mode == "RGB" else (size, size)
            a = np.clip(rng.normal(40 + 70 * c, 20, shape), 0, 255).astype(np.uint8)
            Image.fromarray(a, mode).save(os.path.join(root, f"class{c}", f"{i:03d}.png"))
    return str(root)


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / "images")


def tiny_args(data_path, out, *extra):
    return ["--data", "folder", "--data-path", str(data_path), "--model", "DiT-Mi/4", "--batch-size", "8",
            "--log-every", "2", "--sample-every", "0", "--ckpt-every", "1000", "--warmup-steps", "2", "--disp-group-size", "4",
            "--out", str(out), "--device", "cpu", *extra]


# A guard against a hang, not a speed test: a script that starts in seconds on an idle machine
# took over 2 minutes on one shared with six other jobs (three tests failed at 120 s there).
SUBPROCESS_TIMEOUT = 300


def run_script(*args, timeout=SUBPROCESS_TIMEOUT):
    """Run one of the scripts as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


# What a gloo process sometimes prints as it aborts while exiting, after its work is done and its
# process group destroyed (C++ threads torn down out of order; pytorch/pytorch#190489 and #179291
# report it). Seen once in about 40 two-process runs on a loaded 2-core machine.
GLOO_EXIT_ABORT = "terminate called without an active exception"


def torchrun(nproc, *args):
    """A script under torchrun on nproc CPU processes (gloo), as a user would launch it; run once
    more, and only once, if a process aborted with GLOO_EXIT_ABORT (into a fresh --out again,
    when the first run made it)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")    # two processes on two cores: no thread fights
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    out = str(args[args.index("--out") + 1]) if "--out" in args else None
    made = out is not None and not os.path.exists(out)
    for attempt in range(2):
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180, env=env)
        if GLOO_EXIT_ABORT not in r.stderr:
            break
        print(f"torchrun: a process aborted on exit ({GLOO_EXIT_ABORT}); attempt {attempt + 1} of 2")
        if made:
            shutil.rmtree(out, ignore_errors=True)
    return r


def read_jsonl(path):
    import json
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


# ----------------------------------------------------------------------------------------
# CI=true: a skipped test fails the run. Each optional path (diffusers, torch-fidelity,
# torchdiffeq, the Fashion-MNIST package, a C++ compiler) must then really be tested, not
# silently skipped because CI forgot to install it.
# ----------------------------------------------------------------------------------------

_skipped = []


def _ci():
    return os.environ.get("CI", "").lower() == "true"


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        _skipped.append((report.nodeid, report.longrepr))


def pytest_collectreport(report):            # a whole module skipped (pytest.importorskip at the top)
    if report.skipped:
        _skipped.append((report.nodeid, report.longrepr))


def _reason(longrepr):
    text = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return text.removeprefix("Skipped: ")


def pytest_terminal_summary(terminalreporter):
    if _ci() and _skipped:
        terminalreporter.section("CI=true: skipped tests fail the run", red=True)
        for nodeid, longrepr in _skipped:
            terminalreporter.write_line(f"SKIPPED {nodeid}: {_reason(longrepr)}")


def pytest_sessionfinish(session, exitstatus):
    if _ci() and _skipped and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
