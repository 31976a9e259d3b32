"""Speed and scale: the analytic FLOP count, bench.py, torch.compile, and DDP through torchrun."""
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import train
from bench import forward_macs, model_macs
from conftest import ROOT, read_jsonl, run_script, tiny_args
from model import MODELS, build_model


# DiT's Table 4 (256x256 images = 32x32x4 SD-VAE latents, 256 tokens), as METHOD.md gives
# them. DiT's output layer has 8 channels (it also predicts the noise variance), so pass that.
@pytest.mark.parametrize("name, gmacs", [("DiT-S/2", 6.06), ("DiT-B/2", 23.0), ("DiT-L/2", 80.7), ("DiT-XL/2", 118.6)])
def test_forward_macs_match_the_dit_paper(name, gmacs):
    depth, hidden, heads, patch = MODELS[name]
    ours = forward_macs(depth, hidden, patch, image_size=32, in_channels=4, out_channels=8) / 1e9
    assert abs(ours - gmacs) <= 0.005 * gmacs, (name, ours)


def test_forward_macs_match_pytorchs_flop_counter():
    """PyTorch's FlopCounterMode counts every matrix product actually run (2 FLOPs per MAC);
    the math SDPA backend makes the attention products visible to it."""
    model = build_model("DiT-Mi/4", image_size=16, in_channels=3, num_classes=10)
    B = 3
    x, t, y = torch.randn(B, 3, 16, 16), torch.rand(B), torch.randint(0, 11, (B,))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fwd:
        model(x, t, y)
    assert fwd.get_total_flops() == 2 * B * model_macs(model)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as step:
        model(x, t, y).square().mean().backward()
    # forward + backward = 3 forwards (6 x MACs), up to the input gradients of the first
    # layers, which nothing needs
    assert step.get_total_flops() == pytest.approx(6 * B * model_macs(model), rel=0.02)


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="torch.compile on a CPU needs a C++ compiler")
def test_compiled_model_matches_eager():
    torch.manual_seed(0)
    model = build_model("DiT-Mi/8", image_size=16, in_channels=3, num_classes=10)
    for p in model.parameters():    # a fresh DiT outputs exactly 0, which would prove nothing
        torch.nn.init.normal_(p, std=0.05)
    x, t, y = torch.randn(4, 3, 16, 16), torch.rand(4), torch.tensor([0, 3, 9, 10])
    start = time.perf_counter()
    with torch.no_grad():   # the inference graph only: compiling on a CPU takes tens of seconds
        out_c, feats_c = torch.compile(model)(x, t, y, return_blocks=(2,))
        took = time.perf_counter() - start
        out_e, feats_e = model(x, t, y, return_blocks=(2,))
    assert out_e.abs().mean() > 0.01
    torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(feats_c[2], feats_e[2], rtol=1e-4, atol=1e-5)
    print(f"compiling the tiny model took {took:.1f} s")


def test_bench_runs_on_cpu_and_prints_its_table():
    r = run_script("bench.py", "--device", "cpu", "--model", "DiT-Mi/4", "--image-size", "16", "--batch-size", "8",
                   "--steps", "1", "--rounds", "1", "--warmup", "1", "--sample-steps", "2", "--sample-batches", "1",
                   "--peak-tflops", "1", "--disp-group-size", "4")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "device: cpu" in out and f"torch {torch.__version__}" in out and "DiT-Mi/4" in out
    assert "| training | disp weight |" in out and "| sampling | images/s |" in out
    rows = [l for l in out.splitlines() if l.startswith("| eager |")]
    assert len(rows) == 3 and all("%" in row for row in rows)   # MFU is a percentage when the peak is known

    r = run_script("bench.py", "--device", "cpu", "--model", "DiT-Mi/4", "--image-size", "16", "--batch-size", "8",
                   "--steps", "1", "--rounds", "1", "--warmup", "1", "--sample-batches", "1", "--objective", "meanflow",
                   "--disp-group-size", "0")
    assert r.returncode == 0, r.stderr
    assert "objective meanflow; sampling: 1 meanflow steps" in r.stdout
    assert len([l for l in r.stdout.splitlines() if l.startswith("| eager |")]) == 3

    r = run_script("bench.py", "--device", "cpu", "--batch-size", "0")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith("--batch-size: must be an integer >= 1, got 0")
    r = run_script("bench.py", "--device", "cpu", "--model", "DiT-Mi/4", "--batch-size", "8")
    assert r.returncode == 2 and "--disp-group-size 16 does not divide the batch of 8" in r.stderr


def torchrun(nproc, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")    # two processes on two cores: no thread fights
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180, env=env)


@pytest.mark.parametrize("objective", ["flow", "meanflow"])
def test_ddp_on_two_cpu_processes_matches_one_and_resumes_on_one(image_folder, tmp_path, objective):
    """Both ranks draw the noise of the whole global batch and take their halves, so 2
    processes see the very samples of 1 process; with the dispersive term off, the
    averaged flow loss and the averaged gradients then match the single process. MeanFlow
    computes its target on the bare model (torch.func.jvp cannot go through DDP); its
    gradients are synced by the DDP forward of the loss, which step 2 checks."""
    flags = ["--disp-weight", "0", "--log-every", "1", "--objective", objective]
    train.main(tiny_args(image_folder, tmp_path / "one", "--steps", "3", *flags))
    r = torchrun(2, "train.py", *tiny_args(image_folder, tmp_path / "two", "--steps", "2", *flags))
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.listdir(tmp_path / "two" / "checkpoints") == ["step_0000002.pt"]

    one, two = (read_jsonl(tmp_path / run / "metrics.jsonl") for run in ("one", "two"))
    assert two[0]["type"] == "config" and two[0]["world_size"] == 2
    assert [rec["step"] for rec in two if rec["type"] == "train"] == [1, 2]    # rank 0 alone writes
    for a, b in zip(one[1:3], two[1:3]):
        assert b["flow"] == pytest.approx(a["flow"], rel=1e-5), (a, b)

    # The checkpoint of the 2-process run continues in 1 process, on the same data stream.
    train.main(tiny_args(image_folder, tmp_path / "two", "--steps", "3", "--resume", *flags))
    resumed = read_jsonl(tmp_path / "two" / "metrics.jsonl")[-1]
    assert resumed["step"] == 3 and resumed["flow"] == pytest.approx(one[3]["flow"], rel=1e-4)
