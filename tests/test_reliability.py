"""Issue 6: exact resume lives in test_train.py; here crashes, signals, bad input, unsafe files."""
import argparse
import glob
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import rundir
import sample
import train
from conftest import ROOT, make_image_folder, read_jsonl, run_script, tiny_args, torchrun
from rundir import checkpoint_step, list_checkpoints, load_checkpoint
from utils import UserError, pick_device, run_main


def fast_args(data, out, *extra):
    """A model so small that a step takes milliseconds: 16x16 images, patch 8, 4 tokens."""
    return ["train.py", *tiny_args(data, out, "--model", "DiT-Mi/8", *extra)]


def start(args, log=None):
    """The script in a child process; its output to the file `log` (nothing can fill up and block
    on a pipe nobody reads) or, without one, to pipes for communicate()."""
    if log is not None:
        with open(log, "w") as f:
            return subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop(proc):
    """SIGKILL a child that still runs, and reap it."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=60)


def wait_for(cond, timeout=60, poll=0.02):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        time.sleep(poll)
    return False


def tail(path, n=3000):
    with open(path, errors="replace") as f:
        return f.read()[-n:]


@pytest.mark.slow
def test_sigkill_loop_never_loses_the_latest_checkpoint(image_folder, tmp_path):
    out = tmp_path / "run"
    ckpt_dir = out / "checkpoints"
    rng = random.Random(0)
    kills, verified, newest_step, torn = 0, 0, 0, 0
    in_write = lambda: any(".tmp" in e.name for e in os.scandir(ckpt_dir))
    newest = lambda: rundir.checkpoint_step(list_checkpoints(out)[0]) if list_checkpoints(out) else 0
    # Kills alternate: at a random moment, and as soon as a checkpoint's temporary file exists
    # (inside a write, for certain). The latter repeat until one has left a torn file behind.
    for i in range(10):
        if kills >= 5 and torn:
            break
        # A checkpoint every step (about 20 MB each), so kills land inside writes too.
        extra = ["--steps", "100000", "--ckpt-every", "1", "--keep-ckpts", "2", "--log-every", "5"]
        log = tmp_path / f"child{i}.log"
        proc = start(fast_args(image_folder, out, *extra, *(["--resume"] if i else [])), log)
        try:
            assert wait_for(lambda: newest() > newest_step or proc.poll() is not None), tail(log)
            assert proc.poll() is None, tail(log)                 # training, not crashed
            if i % 2 == 0:
                time.sleep(rng.uniform(0.0, 0.4))
            else:
                assert wait_for(in_write, timeout=30, poll=0.0005), tail(log)
            proc.kill()
        finally:
            stop(proc)
        kills += 1
        torn += bool(glob.glob(str(ckpt_dir / "*.tmp*")))         # the kill landed inside a write
        ckpt = load_checkpoint(list_checkpoints(out)[0])          # the newest must always load
        assert ckpt["step"] >= newest_step                        # and the run never went backwards
        newest_step = ckpt["step"]
        verified += 1
    print(f"kill loop: {kills} SIGKILLs ({torn} inside a checkpoint write), {verified} newest checkpoints "
          f"verified, none lost, last at step {newest_step}")
    assert kills >= 5 and torn >= 1
    # A last resume finishes cleanly from wherever the kills left it and removes the leftovers.
    r = run_script(*fast_args(image_folder, out, "--steps", str(newest_step + 2), "--resume"))
    assert r.returncode == 0, r.stderr
    assert not glob.glob(str(ckpt_dir / "*.tmp*"))
    assert load_checkpoint(list_checkpoints(out)[0])["step"] == newest_step + 2


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_and_exits_cleanly(image_folder, tmp_path, sig):
    out = tmp_path / "run"
    proc = start(fast_args(image_folder, out, "--steps", "100000", "--log-every", "1"))
    try:
        assert wait_for(lambda: os.path.exists(out / "metrics.jsonl") and len(read_jsonl(out / "metrics.jsonl")) > 3)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        stop(proc)                                  # a failed wait never leaves it training 100K steps
    assert proc.returncode == 0, stderr
    assert f"stopped by {sig.name}" in stdout and "--resume" in stdout
    step = load_checkpoint(list_checkpoints(out)[0])["step"]
    assert step >= 3 and f"at step {step}" in stdout


@pytest.mark.slow
def test_a_signal_during_a_sample_grid_cuts_it_short_and_saves(image_folder, tmp_path):
    """A grid of a million sampling steps (hours): the signal stops it within one model
    evaluation, and the checkpoint of its step is written, no grid."""
    out = tmp_path / "run"
    proc = start(fast_args(image_folder, out, "--steps", "100", "--log-every", "1", "--sample-every", "2",
                           "--sample-steps", "1000000"))
    try:
        assert wait_for(lambda: os.path.exists(out / "metrics.jsonl") and len(read_jsonl(out / "metrics.jsonl")) >= 3)
        time.sleep(1)                               # the step-2 log line comes just before the grid
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        stop(proc)
    assert proc.returncode == 0, stderr
    assert "stopped by SIGTERM at step 2" in stdout
    assert [checkpoint_step(p) for p in list_checkpoints(out)] == [2] and not os.listdir(out / "samples")


def test_non_finite_loss_stops_and_keeps_good_checkpoints(image_folder, tmp_path):
    out = tmp_path / "run"
    # A huge learning rate without clipping makes the weights overflow: the loss of step 2 is inf / nan.
    r = run_script(*fast_args(image_folder, out, "--steps", "20", "--lr", "1e30", "--grad-clip", "0",
                              "--warmup-steps", "1", "--ckpt-every", "1", "--log-every", "5"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "loss became non-finite: flow (step 2)" in r.stderr.splitlines()[-1]
    for path in list_checkpoints(out):
        ck = load_checkpoint(path)
        assert all(torch.isfinite(v).all() for v in ck["model"].values()), path


def test_pickled_checkpoint_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "model_config": {}, "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(UserError, match="refusing to load .*pickled Python objects.*Namespace"):
        load_checkpoint(str(path))
    r = run_script("sample.py", "--ckpt", str(path))
    assert r.returncode == 2 and "refusing" in r.stderr and "Traceback" not in r.stderr


def test_foreign_and_mismatched_checkpoints(image_folder, tmp_path):
    out = tmp_path / "run"
    train.main(tiny_args(image_folder, out, "--steps", "2"))
    ckpt = list_checkpoints(out)[0]
    r = run_script("train.py", *tiny_args(image_folder, out, "--steps", "4", "--resume", "--model", "DiT-Ti/4"))
    assert r.returncode == 2 and "its name is 'DiT-Mi/4', this run's is 'DiT-Ti/4'" in r.stderr
    gray = make_image_folder(tmp_path / "gray", mode="L")
    r = run_script("train.py", *tiny_args(gray, out, "--steps", "4", "--resume"))
    assert r.returncode == 2 and "in_channels is 3, this run's is 1" in r.stderr
    # sample.py with weights that do not fit the model the checkpoint names
    ck = torch.load(ckpt, weights_only=True)
    ck["model_config"]["name"] = "DiT-Ti/4"
    torch.save(ck, tmp_path / "foreign.pt")
    r = run_script("sample.py", "--ckpt", str(tmp_path / "foreign.pt"))
    assert r.returncode == 2 and "do not fit DiT-Ti/4" in r.stderr and "Traceback" not in r.stderr
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    r = run_script("sample.py", "--ckpt", str(tmp_path / "other.pt"))
    assert r.returncode == 2 and "not a checkpoint written by train.py" in r.stderr
    (tmp_path / "garbage.pt").write_bytes(b"not a zip file")
    r = run_script("sample.py", "--ckpt", str(tmp_path / "garbage.pt"))
    assert r.returncode == 2 and "cannot read checkpoint" in r.stderr
    with pytest.raises(UserError, match=r"\(damaged or not a checkpoint\): UnpicklingError not a file torch.save wrote$"):
        load_checkpoint(str(tmp_path / "garbage.pt"))     # not torch's advice about weights_only


def test_checkpoints_that_describe_no_model_or_hold_broken_weights(image_folder, tmp_path):
    """A hand-edited model_config, weights of another shape, or non-finite weights: one line each
    from sample.py (and fid.py, probe.py: the same loader), naming what is wrong."""
    train.main(tiny_args(image_folder, tmp_path / "run", "--steps", "1"))
    good = load_checkpoint(list_checkpoints(tmp_path / "run")[0])
    edits = {"unknown model 'DiT-Zz/4'": lambda c: c["model_config"].update(name="DiT-Zz/4"),
             "KeyError: 'image_size'": lambda c: c["model_config"].pop("image_size"),
             "image size 30 is not divisible": lambda c: c["model_config"].update(image_size=30),
             r"image_size -16 and in_channels 3 must be integers >= 1": lambda c: c["model_config"].update(image_size=-16),
             r"image_size 16 and in_channels 3.0 must be": lambda c: c["model_config"].update(in_channels=3.0),
             "size mismatch for y_embed.table.weight": lambda c: c["model_config"].update(num_classes=5),
             "'ema' weights are not all finite": lambda c: c["ema"].update(
                 {k: v * float("nan") for k, v in c["ema"].items()})}
    for i, (message, edit) in enumerate(edits.items()):
        ck = load_checkpoint(list_checkpoints(tmp_path / "run")[0])
        edit(ck)
        torch.save(ck, tmp_path / f"{i}.pt")
        with pytest.raises(UserError, match=message):
            sample.load_model(str(tmp_path / f"{i}.pt"))
    assert sample.load_model(list_checkpoints(tmp_path / "run")[0])[1].num_classes == good["model_config"]["num_classes"]


def test_hand_edited_training_entries_are_one_line(image_folder, tmp_path, capsys):
    """Entries of the wrong kind (a list for model_config, a string for the step) are refused
    when the file is loaded, by sample.py as by train.py; entries of the right kind that do not
    fit (a random state of the wrong size, an optimiser of another model) when --resume loads
    them. Both name the file and the entry."""
    out = tmp_path / "run"
    train.main(tiny_args(image_folder, out, "--steps", "2"))
    path = list_checkpoints(out)[0]
    at_load = {"model_config": ["DiT-Mi/4", 16], "step": "2", "rng": [1, 2], "args": [1], "opt": "x",
               "ema": [1], "world_size": "2", "classes": 5}
    for key, value in at_load.items():
        ck = load_checkpoint(path)
        ck[key] = value
        torch.save(ck, tmp_path / "edited.pt")
        with pytest.raises(UserError, match=f"its '{key}' is {type(value).__name__} .*, not a"):
            load_checkpoint(str(tmp_path / "edited.pt"))
    for key, value, least in (("step", -1, 0), ("world_size", 0, 1), ("data_size", -1, 0)):
        ck = load_checkpoint(path)
        ck[key] = value
        torch.save(ck, tmp_path / "edited.pt")
        with pytest.raises(UserError, match=f"its '{key}' is int {value}, not an int >= {least}"):
            load_checkpoint(str(tmp_path / "edited.pt"))
    # a checkpoint slimmed for sharing (its optimiser set to None) still samples, and cannot resume
    ck = load_checkpoint(path)
    ck["opt"] = None
    torch.save(ck, tmp_path / "slim.pt")
    assert sample.load_model(str(tmp_path / "slim.pt"))[0].get("opt") is None
    with pytest.raises(UserError, match="has no opt: it cannot continue a training run"):
        train.main(tiny_args(image_folder, tmp_path / "other", "--steps", "4", "--resume", str(tmp_path / "slim.pt")))
    at_resume = {"its 'rng': RuntimeError Expected a CPUGeneratorImplState of size": lambda c: c["rng"].update(torch=torch.zeros(10, dtype=torch.uint8)),
                 "its 'rng': TypeError RNG state must be a torch.ByteTensor": lambda c: c["rng"].update(torch=torch.zeros(5056)),
                 "its 'opt': ValueError loaded state dict has a different number of parameter groups": lambda c: c["opt"].update(param_groups=[]),
                 "its 'ema': RuntimeError .*Missing key.*patch_embed.weight": lambda c: c["ema"].pop("patch_embed.weight"),
                 # weights that would be saved again at every checkpoint, moments that AdamW's step would fail on
                 "NaN or inf in its 'ema' weights": lambda c: c["ema"]["final.linear.bias"].fill_(float("nan")),
                 r"its 'opt' holds exp_avg of shape \(3,\) for parameter 0, of shape \(128, 3, 4, 4\)":
                     lambda c: c["opt"]["state"][0].update(exp_avg=torch.zeros(3)),
                 "NaN or inf in its 'opt' exp_avg_sq of parameter 1":
                     lambda c: c["opt"]["state"][1]["exp_avg_sq"].fill_(float("inf"))}
    original = load_checkpoint(path)
    for message, edit in at_resume.items():
        ck = load_checkpoint(path)
        edit(ck)
        torch.save(ck, path)
        with pytest.raises(UserError, match=f"checkpoint .* cannot continue this run: {message}"):
            train.main(tiny_args(image_folder, out, "--steps", "4", "--resume", path))
        # ... refused before anything was written: not into a new run directory either
        with pytest.raises(UserError, match=f"checkpoint .* cannot continue this run: {message}"):
            train.main(tiny_args(image_folder, tmp_path / "fork", "--steps", "4", "--resume", path))
        assert not (tmp_path / "fork").exists()
        torch.save(original, path)
    # a hand-edited value inside its args is a changed flag, not a TypeError (here with --disp-group-size 0,
    # whose warning compares the saved batch with this run's)
    ck = load_checkpoint(path)
    ck["args"]["batch_size"] = "8"
    torch.save(ck, tmp_path / "edited.pt")
    capsys.readouterr()
    train.main(tiny_args(image_folder, tmp_path / "args_edited", "--steps", "3", "--disp-group-size", "0",
                         "--resume", str(tmp_path / "edited.pt")))
    assert re.search("warning: resuming with changed .*--batch-size", capsys.readouterr().err)
    train.main(tiny_args(image_folder, out, "--steps", "4", "--resume", path))     # the original still resumes
    assert checkpoint_step(list_checkpoints(out)[0]) == 4

def test_resume_skips_a_damaged_newest_checkpoint(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(tiny_args(image_folder, out, "--steps", "2"))
    with open(out / "checkpoints" / "step_0000009.pt", "wb") as f:      # e.g. a truncated copy
        f.write(open(list_checkpoints(out)[0], "rb").read()[:1000])
    path, ck = rundir.find_resume_checkpoint(str(out))
    assert ck["step"] == 2 and path.endswith("step_0000002.pt")
    assert "skipping unreadable checkpoint" in capsys.readouterr().err


def test_pruning_never_keeps_a_damaged_newer_checkpoint_in_place_of_the_new_one(image_folder, tmp_path, capsys):
    """A damaged step 9 above the step 2 that --resume falls back to: the run writes step 3 and
    prunes to 1 checkpoint. Step 9 must not count as the newest (it did: step 3 was deleted, and
    only the damaged file was left); it is left alone, and the next --resume skips it again."""
    out = tmp_path / "run"
    train.main(tiny_args(image_folder, out, "--steps", "2"))
    with open(out / "checkpoints" / "step_0000009.pt", "wb") as f:
        f.write(open(list_checkpoints(out)[0], "rb").read()[:1000])
    train.main(tiny_args(image_folder, out, "--steps", "3", "--resume", "--keep-ckpts", "1"))
    assert [os.path.basename(p) for p in list_checkpoints(out)] == ["step_0000009.pt", "step_0000003.pt"]
    assert rundir.find_resume_checkpoint(str(out))[1]["step"] == 3
    assert "skipping unreadable checkpoint" in capsys.readouterr().err


def test_resume_applies_changed_optimiser_flags(image_folder, tmp_path, capsys):
    """--adam-beta2 and --weight-decay changed on --resume: AdamW's moments come from the
    checkpoint, its settings from the flags (load_state_dict alone brought the old ones back,
    while the log recorded the new ones)."""
    out = tmp_path / "run"
    train.main(tiny_args(image_folder, out, "--steps", "2"))
    train.main(tiny_args(image_folder, out, "--steps", "3", "--resume", "--adam-beta2", "0.95", "--weight-decay", "0.1"))
    assert "resuming with changed --adam-beta2, --weight-decay" in capsys.readouterr().err
    ck = load_checkpoint(list_checkpoints(out)[0])
    assert ck["step"] == 3 and ck["args"]["adam_beta2"] == 0.95
    assert [(g["betas"], g["weight_decay"]) for g in ck["opt"]["param_groups"]] == [((0.9, 0.95), 0.1)]
    assert len(ck["opt"]["state"]) > 0 and all(s["step"] == 3 for s in ck["opt"]["state"].values())


def test_a_run_that_trained_into_out_while_this_one_started_is_not_overwritten(image_folder, tmp_path, monkeypatch):
    """prepare() checks --out before the data is loaded; create() takes the lock after. Another
    run that trained there in between (it finished and let go of the lock) must not have its
    checkpoints overwritten and its log moved aside: create() checks again, under the lock."""
    out, other = tmp_path / "run", tmp_path / "other"
    real_create = rundir.create

    def another_run_first(*args, **kwargs):
        monkeypatch.setattr(rundir, "create", real_create)
        train.main(tiny_args(image_folder, out, "--steps", "2", "--seed", "7"))      # the other run, start to end
        return real_create(*args, **kwargs)
    train.main(tiny_args(image_folder, other, "--steps", "1"))                        # the control: no error
    monkeypatch.setattr(rundir, "create", another_run_first)
    with pytest.raises(UserError, match="another run wrote checkpoints there while this one was starting"):
        train.main(tiny_args(image_folder, out, "--steps", "1"))
    assert [os.path.basename(p) for p in list_checkpoints(out)] == ["step_0000002.pt"]
    assert load_checkpoint(list_checkpoints(out)[0])["args"]["seed"] == 7
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "train"] == [2]


def test_resume_drops_log_lines_that_are_not_records_with_a_warning(image_folder, tmp_path, capsys):
    """A hand-edited log (a JSON list, a step that is a string, bytes that are not UTF-8) resumes:
    those lines are dropped from the trimmed log, with a word; a torn last line silently."""
    out = tmp_path / "run"
    train.main(tiny_args(image_folder, out, "--steps", "2"))
    with open(out / "metrics.jsonl", "ab") as f:
        f.write(b'[1, 2]\n{"type": "note", "step": "2"}\n\xff\xfe not text\n{"type": "note"}\n{"type": "tr')
    capsys.readouterr()
    train.main(tiny_args(image_folder, out, "--steps", "4", "--resume"))
    assert "metrics.jsonl': dropping 3 line(s) that are not train.py's records" in capsys.readouterr().err
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["type"] for r in records] == ["config", "train", "note", "config", "train"]   # a record without a step stays
    assert [r["step"] for r in records if r["type"] == "train"] == [2, 4]
    with open(out / "metrics.jsonl", "a") as f:
        f.write("[3]\n")                       # whole, though last: not a torn line
    train.main(tiny_args(image_folder, out, "--steps", "6", "--resume"))
    assert "dropping 1 line(s)" in capsys.readouterr().err
    train.main(tiny_args(image_folder, out, "--steps", "8", "--resume"))     # a clean log: no warning
    assert "dropping" not in capsys.readouterr().err


def test_a_grid_cut_short_by_a_signal_is_drawn_when_the_run_resumes(image_folder, tmp_path, monkeypatch, capsys):
    """SIGTERM during step 2, whose grid is due: the checkpoint of step 2 comes first, without the
    grid; the resumed run draws it before training on. A signal during that grid stops the run
    at once (the checkpoint of step 2 is on disk), and a later resume still draws it."""
    out = tmp_path / "run"
    real_step = train.train_step

    def step_with_a_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)     # the handler only raises train.py's flag
        return real_step(*args, **kwargs)
    calls = []
    monkeypatch.setattr(train, "train_step", step_with_a_signal)
    flags = ["--sample-every", "2", "--sample-steps", "2", "--ckpt-every", "2", "--keep-ckpts", "0"]
    train.main(tiny_args(image_folder, out, "--steps", "4", *flags))
    assert [checkpoint_step(p) for p in list_checkpoints(out)] == [2] and os.listdir(out / "samples") == []
    monkeypatch.setattr(train, "train_step", real_step)
    real_generate = train.generate

    def generate_with_a_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_generate(*args, **kwargs)
    monkeypatch.setattr(train, "generate", generate_with_a_signal)
    capsys.readouterr()
    train.main(tiny_args(image_folder, out, "--steps", "4", *flags, "--resume"))
    assert "stopped by SIGTERM at step 2, before training on" in capsys.readouterr().out
    assert [checkpoint_step(p) for p in list_checkpoints(out)] == [2] and os.listdir(out / "samples") == []
    monkeypatch.setattr(train, "generate", real_generate)
    train.main(tiny_args(image_folder, out, "--steps", "4", *flags, "--resume"))
    assert sorted(os.listdir(out / "samples")) == ["step_0000002.png", "step_0000004.png"]
    assert [checkpoint_step(p) for p in list_checkpoints(out)] == [4, 2]


def test_resume_on_other_data_warns(image_folder, tmp_path, capsys):
    """--data-path is plumbing (a set moved elsewhere), so what the run trained on is checked by
    the checkpoint's record of it: the number of samples and the class names."""
    out = tmp_path / "run"
    train.main(tiny_args(image_folder, out, "--steps", "2"))
    moved = tmp_path / "moved"
    moved.mkdir()
    os.rename(image_folder, moved / "data")
    capsys.readouterr()
    train.main(tiny_args(moved / "data", out, "--steps", "3", "--resume"))
    err = capsys.readouterr().err
    assert "other data" not in err and "changed" not in err           # the same images elsewhere: no warning
    more = make_image_folder(tmp_path / "more", per_class=9)
    train.main(tiny_args(more, out, "--steps", "4", "--resume"))
    assert "warning: resuming on other data (27 samples, not 24)" in capsys.readouterr().err
    renamed = tmp_path / "renamed"
    shutil.copytree(more, renamed)
    os.rename(renamed / "class1", renamed / "dog")
    train.main(tiny_args(renamed, out, "--steps", "5", "--resume"))
    assert "resuming on other data (class 1 is 'class2', not 'class1')" in capsys.readouterr().err


def test_resume_compares_the_regulariser_as_it_acts(image_folder, tmp_path, capsys):
    """On DiT-Mi/4 (4 blocks) the default --disp-block is block 1: naming it is no change. Nor is
    the tau of a hinge run from before train.py refused --disp-tau there, resumed without it."""
    out = tmp_path / "run"
    train.main(tiny_args(image_folder, out, "--steps", "2"))
    capsys.readouterr()
    train.main(tiny_args(image_folder, out, "--steps", "3", "--resume", "--disp-block", "1"))
    assert "resuming with changed" not in capsys.readouterr().err
    train.main(tiny_args(image_folder, out, "--steps", "4", "--resume", "--disp-block", "1,2"))
    assert "resuming with changed --disp-block" in capsys.readouterr().err
    train.main(tiny_args(image_folder, tmp_path / "hinge", "--steps", "2", "--disp-variant", "hinge"))
    path = list_checkpoints(tmp_path / "hinge")[0]
    ck = load_checkpoint(path)
    ck["args"]["disp_tau"] = 1.0
    torch.save(ck, path)
    capsys.readouterr()
    train.main(tiny_args(image_folder, tmp_path / "hinge", "--steps", "3", "--disp-variant", "hinge", "--resume"))
    assert "resuming with changed" not in capsys.readouterr().err
    # the same checkpoint continued with infonce_l2: its tau of 1 now counts
    train.main(tiny_args(image_folder, tmp_path / "infonce", "--steps", "3", "--resume", path))
    assert "resuming with changed --disp-tau, --disp-variant" in capsys.readouterr().err


def test_nothing_non_finite_is_saved_nor_resumed_from():
    """rundir.not_finite, which save() and --resume ask: weights, EMA, and AdamW's moments (a
    squared gradient can overflow to inf while the weights stay finite)."""
    model = torch.nn.Linear(2, 2)
    ema = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    assert rundir.not_finite(model, ema, opt) is None
    opt.state[model.bias]["exp_avg_sq"][0] = float("inf")
    assert rundir.not_finite(model, ema, opt) == "'opt' exp_avg_sq of parameter 1"
    ema.weight.data[0, 0] = float("nan")
    assert rundir.not_finite(model, ema, opt) == "'ema' weights"


def test_resume_after_a_torn_log_line_and_from_the_run_directory(image_folder, tmp_path):
    out = tmp_path / "run"
    train.main(tiny_args(image_folder, out, "--steps", "2"))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"type": "train", "step": 3, "flo')             # killed in mid-write
    args = tiny_args(image_folder, out, "--steps", "4")
    i = args.index("--out")
    train.main(args[:i] + args[i + 2:] + ["--resume", str(out)])  # no --out: the run directory is --resume's
    assert [os.path.basename(p) for p in list_checkpoints(out)] == ["step_0000004.pt", "step_0000002.pt"]
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "train"] == [2, 4]


def test_resume_from_an_older_file_or_a_stray_file_is_refused(image_folder, tmp_path):
    out = tmp_path / "run"
    train.main(tiny_args(image_folder, out, "--steps", "4", "--ckpt-every", "2", "--keep-ckpts", "0"))
    older = str(out / "checkpoints" / "step_0000002.pt")
    assert "has checkpoints newer than" in bad(tmp_path, *tiny_args(image_folder, out, "--steps", "6", "--resume", older))
    stray = tmp_path / "best.pt"
    stray.write_bytes(open(older, "rb").read())
    args = tiny_args(image_folder, out, "--steps", "6")
    i = args.index("--out")
    assert "outside a run directory" in bad(tmp_path, *(args[:i] + args[i + 2:]), "--resume", str(stray))
    assert [os.path.basename(p) for p in list_checkpoints(out)] == ["step_0000004.pt", "step_0000002.pt"]


def test_resume_from_another_run_never_lands_on_a_run_with_checkpoints(image_folder, tmp_path):
    """--resume X --out Y continues X's run in Y: refused when Y holds a run of its own (its
    checkpoints would be pruned or overwritten, its log trimmed); into an empty Y it starts Y's log."""
    x, y = tmp_path / "x", tmp_path / "y"
    train.main(tiny_args(image_folder, x, "--steps", "2"))
    train.main(tiny_args(image_folder, y, "--steps", "4", "--seed", "5", "--ckpt-every", "2", "--keep-ckpts", "0"))
    before = {p: open(p, "rb").read() for p in list_checkpoints(y)}
    log = (y / "metrics.jsonl").read_text()
    assert "holds checkpoints of its own run" in bad(tmp_path, *tiny_args(image_folder, y, "--steps", "3",
                                                                               "--resume", str(x)))
    assert {p: open(p, "rb").read() for p in list_checkpoints(y)} == before and (y / "metrics.jsonl").read_text() == log
    z = tmp_path / "z"
    z.mkdir()
    (z / "metrics.jsonl").write_text('{"type": "train", "step": 1, "flow": 9}\n')     # a failed start's log
    train.main(tiny_args(image_folder, z, "--steps", "3", "--resume", str(x)))
    assert [(r["type"], r["step"]) for r in read_jsonl(z / "metrics.jsonl")] == [("config", 2), ("train", 3)]
    assert read_jsonl(z / "metrics.jsonl")[0]["resumed_from"].startswith(str(x))


def test_a_second_process_cannot_train_into_a_locked_run_directory(image_folder, tmp_path):
    fcntl = pytest.importorskip("fcntl")
    out = tmp_path / "run"
    train.main(tiny_args(image_folder, out, "--steps", "2"))
    with open(out / ".lock", "w") as held:              # as another process training there holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        log = (out / "metrics.jsonl").read_text()
        assert "another process is training into --out" in bad(
            tmp_path, *tiny_args(image_folder, out, "--steps", "4", "--resume"))
        assert (out / "metrics.jsonl").read_text() == log
    train.main(tiny_args(image_folder, out, "--steps", "4", "--resume"))      # released: it continues
    assert load_checkpoint(list_checkpoints(out)[0])["step"] == 4


def test_a_file_system_without_locks_warns_and_trains(image_folder, tmp_path, monkeypatch, capsys):
    if rundir.fcntl is None:
        pytest.skip("no fcntl here: runs are never locked")

    def no_locks(f, how):
        raise OSError(38, "Function not implemented")       # ENOSYS, as some network file systems answer
    monkeypatch.setattr(rundir.fcntl, "flock", no_locks)
    train.main(tiny_args(image_folder, tmp_path / "run", "--steps", "1"))
    assert "nothing stops a second run there" in capsys.readouterr().err
    assert list_checkpoints(tmp_path / "run")


def test_an_unwritable_checkpoint_folder_stops_the_run_before_training(image_folder, tmp_path, monkeypatch):
    out = tmp_path / "run"
    (out / "checkpoints" / f".write_test{os.getpid()}").mkdir(parents=True)   # opening it to write fails
    calls = []
    monkeypatch.setattr(train, "train_step", lambda *a, **k: calls.append(1))
    with pytest.raises(UserError, match="cannot write to --out .*write_test"):
        train.main(tiny_args(image_folder, out, "--steps", "2"))
    assert calls == []


def test_resuming_whole_batch_groups_on_another_number_of_processes_warns(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    args = tiny_args(image_folder, out, "--disp-group-size", "0")
    train.main(args + ["--steps", "2"])
    path = list_checkpoints(out)[0]
    ck = load_checkpoint(path)
    assert ck["world_size"] == 1
    ck["world_size"] = 2                    # as if two processes had trained it, 4 samples each
    torch.save(ck, path)
    capsys.readouterr()
    train.main(args + ["--steps", "3", "--resume"])
    assert ("each dispersive group is one forward pass's batch: 4 samples in the run resumed (2 process(es) x 1 "
            "micro-batch(es)), 8 now (1 x 1)") in capsys.readouterr().err
    # so does what --accum-steps holds in one pass: 8 -> 4 (and no changed-flags warning: it is plumbing)
    train.main(args + ["--steps", "4", "--resume", "--accum-steps", "2"])
    err = capsys.readouterr().err
    assert "8 samples in the run resumed (1 process(es) x 1 micro-batch(es)), 4 now (1 x 2)" in err, err
    assert "changed" not in err, err


def test_resume_needs_the_optimiser_state(image_folder, tmp_path):
    out = tmp_path / "run"
    train.main(tiny_args(image_folder, out, "--steps", "2"))
    ckpt = load_checkpoint(list_checkpoints(out)[0])
    del ckpt["opt"]
    torch.save(ckpt, tmp_path / "weights_only.pt")
    assert "has no opt: it cannot continue a training run" in bad(
        tmp_path, *tiny_args(image_folder, tmp_path / "new", "--steps", "4", "--resume", str(tmp_path / "weights_only.pt")))


def test_disk_full_during_checkpoint_write(image_folder, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train.main(tiny_args(image_folder, out, "--steps", "2"))
    good = list_checkpoints(out)[0]
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        f.write(b"x" * 4096)                       # part of the file reaches the disk ...
        raise OSError(28, "No space left on device")   # ... then the disk is full
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(UserError, match="could not write checkpoint .*No space left on device.*intact"):
        train.main(tiny_args(image_folder, out, "--steps", "4", "--ckpt-every", "3", "--resume"))
    monkeypatch.setattr(torch, "save", real_save)
    assert list_checkpoints(out) == [good] and load_checkpoint(good)["step"] == 2
    assert not glob.glob(str(out / "checkpoints" / "*.tmp*"))


def test_disk_full_while_logging_or_writing_samples(image_folder, tmp_path, monkeypatch):
    """The log: one line naming it, not a traceback from json's write. sample.py's .npz and
    grids go through utils.atomic_output: a disk that fills up in mid-write leaves the file that
    was there whole, and no temporary file."""
    import builtins
    import numpy as np
    out = tmp_path / "run"
    train.main(tiny_args(image_folder, out, "--steps", "2"))
    real_open = builtins.open

    def full_log(path, mode="r", *a, **k):        # the disk fills up after the config line
        if str(path).endswith("metrics.jsonl") and mode == "a":
            appends.append(path)
            if len(appends) > 2:
                raise OSError(28, "No space left on device")
        return real_open(path, mode, *a, **k)
    appends = []
    with monkeypatch.context() as m:
        m.setattr(builtins, "open", full_log)
        with pytest.raises(UserError, match=r"could not write the log .*metrics.jsonl.*No space left.*--resume"):
            train.main(tiny_args(image_folder, out, "--steps", "4", "--resume"))

    ckpt, npz, png = list_checkpoints(out)[0], tmp_path / "s.npz", tmp_path / "g.png"
    sample.main(["--ckpt", ckpt, "--steps", "1", "--num-samples", "3", "--out", str(npz), "--device", "cpu"])
    sample.main(["--ckpt", ckpt, "--steps", "1", "--out", str(png), "--device", "cpu"])
    before = npz.read_bytes(), png.read_bytes()

    def full_disk(f, *a, **k):
        f.write(b"x" * 4096)
        raise OSError(28, "No space left on device")
    import torchvision.utils
    with monkeypatch.context() as m:
        m.setattr(np, "savez", full_disk)
        m.setattr(torchvision.utils, "save_image", lambda images, f, **k: full_disk(f))
        with pytest.raises(UserError, match=r"could not write --out .*s.npz.*No space left"):
            sample.main(["--ckpt", ckpt, "--steps", "1", "--num-samples", "3", "--out", str(npz), "--device", "cpu"])
        with pytest.raises(UserError, match=r"could not write .*g.png.*No space left"):
            sample.main(["--ckpt", ckpt, "--steps", "1", "--out", str(png), "--device", "cpu"])
    assert (npz.read_bytes(), png.read_bytes()) == before and not glob.glob(str(tmp_path / "*.tmp*"))


def test_a_signal_from_another_rank_then_this_ranks_own_still_saves():
    """Under torchrun, agree_to_stop marks a stop that another rank saw; this rank's own first
    signal (torchrun passes a Ctrl-C on to every worker) must not count as a second Ctrl-C,
    which quits at once without saving. Its second one does."""
    with rundir.stop_on_signals() as stop:
        stop["signal"] = "a signal on another rank"          # what agree_to_stop writes
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop["signal"] == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)


RANK0_FIRST = """
import os, sys
sys.path.insert(0, {root!r})
import torch, torch.distributed as dist
from utils import UserError, rank0_first, run_main

def main():
    dist.init_process_group("gloo")
    with rank0_first(torch.device("cpu")):
        os.write(1, f"rank {{dist.get_rank()}} runs the block\\n".encode())     # one write: lines of ranks stay whole
        if dist.get_rank() == {bad}:
            raise UserError(f"rank {{dist.get_rank()}}'s own failure")
    os.write(1, f"rank {{dist.get_rank()}} went on\\n".encode())
    dist.destroy_process_group()

run_main(main)
"""


@pytest.mark.slow
@pytest.mark.parametrize("bad", [None, 0, 2])
def test_rank0_first_runs_rank_0_first_and_a_failure_on_any_rank_stops_all(tmp_path, bad):
    """utils.rank0_first on 3 processes: rank 0 runs the block before the others; a failure on
    rank 0 keeps the others from running it, and a failure on any rank stops every rank with one
    line each (the failed rank's own error, and 'stopping: rank k failed' on the others)."""
    script = tmp_path / "r0f.py"
    script.write_text(RANK0_FIRST.format(root=ROOT, bad=-1 if bad is None else bad))
    r = torchrun(3, str(script))
    ran = [line for line in r.stdout.splitlines() if line.endswith("runs the block")]
    went_on = [line for line in r.stdout.splitlines() if line.endswith("went on")]
    errors = sorted(line for line in r.stderr.splitlines() if line.startswith("error: "))
    # no traceback through our code (torchrun prints one of its own when a process fails)
    assert 'r0f.py", line' not in r.stderr and "utils.py" not in r.stderr and "Connection closed" not in r.stderr
    if bad is None:
        assert r.returncode == 0 and ran[0] == "rank 0 runs the block" and len(ran) == 3 and len(went_on) == 3, r.stderr
    elif bad == 0:
        assert r.returncode != 0 and ran == ["rank 0 runs the block"] and not went_on
        assert errors == ["error: rank 0's own failure"] + ["error: stopping: rank 0 failed (its error is above)"] * 2
    else:
        assert r.returncode != 0 and len(ran) == 3 and not went_on
        assert errors == ["error: rank 2's own failure"] + ["error: stopping: rank 2 failed (its error is above)"] * 2


# ---- bad input: one clear line, exit status 2, nothing written is lost -------------------

def bad(tmp_path, *args, script="train.py"):
    r = run_script(script, *args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    return r.stderr.strip().splitlines()[-1]


def test_bad_data_inputs(tmp_path):
    out = ["--out", str(tmp_path / "o"), "--steps", "1"]
    assert "is not a directory" in bad(tmp_path, "--data", "folder", "--data-path", str(tmp_path / "missing"), *out)
    (tmp_path / "empty").mkdir()
    assert "no images found" in bad(tmp_path, "--data", "folder", "--data-path", str(tmp_path / "empty"), *out)
    folder = make_image_folder(tmp_path / "broken", per_class=2)
    open(os.path.join(folder, "class0", "notes.txt"), "w").write("not an image, ignored")
    open(os.path.join(folder, "class1", "bad.png"), "wb").write(b"\x89PNG broken")
    assert "cannot read image" in bad(tmp_path, "--data", "folder", "--data-path", folder, *out)
    odd = make_image_folder(tmp_path / "odd", size=18)
    assert "not divisible by the patch size" in bad(tmp_path, "--data", "folder", "--data-path", odd, "--model", "DiT-Mi/4", *out)
    assert not (tmp_path / "o").exists()        # none of these failed starts left a run directory


def test_an_image_too_large_to_decode_is_one_line(tmp_path, monkeypatch):
    """PIL refuses images over twice its MAX_IMAGE_PIXELS (a decompression bomb) with an error of
    its own, not an OSError: one line, in train.py's folder loader as in fid.py's."""
    import fid
    from PIL import Image
    from data import load_dataset
    folder = make_image_folder(tmp_path / "big", per_class=2)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)          # 16 x 16 = 256 pixels: over twice that
    with pytest.raises(UserError, match=r"cannot read image .*000.png.*exceeds limit.*remove it from --data-path"):
        load_dataset("folder", folder)
    with pytest.raises(UserError, match=r"cannot read image .*exceeds limit.*\(--samples\)"):
        fid.load_images(os.path.join(folder, "class0"))


def test_fid_reads_16_bit_grey_images_as_train_py_does(tmp_path):
    """fid.py --samples DIR went through convert("RGB"), which clips 16-bit grey to white; it now
    reads them as data.py does (the high byte), and, all grey, as 1-channel images."""
    import fid
    import numpy as np
    from PIL import Image
    grey16 = (np.arange(16 * 16).reshape(16, 16) * 256 + 255).astype(np.uint16)    # high bytes 0..255
    for i in range(2):
        Image.fromarray(grey16).save(tmp_path / f"{i}.png")
    images, _ = fid.load_images(str(tmp_path))
    assert images.shape == (2, 1, 16, 16) and images[0, 0].flatten().tolist() == list(range(256))


def test_an_npy_file_named_npz_is_one_line(tmp_path):
    """np.load of np.save's single array gives an ndarray, not an archive: `with` on it raised a
    TypeError from deep inside fid.py."""
    import fid
    import numpy as np
    np.save(tmp_path / "x.npy", np.zeros((4, 8, 8, 3), np.uint8))
    os.replace(tmp_path / "x.npy", tmp_path / "x.npz")
    with pytest.raises(UserError, match=r"--samples .*x.npz.*in np.save's .npy format, not an .npz archive"):
        fid.load_images(str(tmp_path / "x.npz"))
    with pytest.raises(UserError, match=r"--ref-stats .*x.npz.*in np.save's .npy format"):
        fid.reference_stats(None, {"name": "fd-classifier", "dim": 8}, stats_path=str(tmp_path / "x.npz"))


def test_probe_sizes_and_seeds_are_bounded_by_their_flags(tmp_path, capsys):
    """A probe fitted on 2 images (a fifth of them chooses the weight decay: 1 image, whose std is
    NaN) ended in L-BFGS's overflow; a seed beyond 64 bits in the generator's. Now argparse says so."""
    import ab
    import probe
    for main, argv, flag in [(probe.main, ["--ckpt", "x", "--train-samples", "2"], "--train-samples"),
                             (probe.main, ["--ckpt", "x", "--seed", str(2 ** 64)], "--seed"),
                             (ab.main, ["--compare", "x", "--probe-train-samples", "2"], "--probe-train-samples"),
                             (ab.main, ["--compare", "x", "--sample-seed", str(2 ** 64)], "--sample-seed")]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and f"argument {flag}: must be an integer >= " in capsys.readouterr().err


def test_an_image_folder_of_one_class_warns(tmp_path, capsys):
    """--data-path at the parent of the class folders (an unzipped set's root holding train/):
    ImageFolder's layout makes it one class. Not an error (an unconditional set is one class),
    but said."""
    from data import load_dataset
    make_image_folder(tmp_path / "set" / "train", classes=1, per_class=2)
    assert load_dataset("folder", str(tmp_path / "set")).num_classes == 1
    assert "warning: --data-path '" in (err := capsys.readouterr().err) and "has one class folder, 'train'" in err
    # named by the caller's flag (fid.py's reference), and said by one rank of a torchrun job only
    load_dataset("folder", str(tmp_path / "set"), flags=("--ref-data", "--ref-data-path"))
    assert "warning: --ref-data-path '" in capsys.readouterr().err
    assert load_dataset("folder", str(tmp_path / "set"), warn=False).num_classes == 1
    assert capsys.readouterr().err == ""
    load_dataset("folder", make_image_folder(tmp_path / "two", classes=2, per_class=2))
    assert "one class folder" not in capsys.readouterr().err


def test_mixed_grayscale_and_colour_becomes_rgb(tmp_path):
    from data import load_dataset
    root = make_image_folder(tmp_path / "mixed", per_class=2)
    make_image_folder(tmp_path / "mixed", classes=1, per_class=1, mode="L", seed=5)   # overwrites class0/000.png
    ds = load_dataset("folder", root)
    assert ds.shape == (3, 16, 16)
    gray = ds.images[0]                                # the grayscale file, replicated to 3 equal channels
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


@pytest.mark.parametrize("flags,message", [
    (["--disp-block", "13"], "out of range"),
    (["--disp-weight", "-1"], "--disp-weight: must be a finite number >= 0, got -1"),
    (["--disp-weight", "nan"], "--disp-weight: must be a finite number >= 0, got nan"),
    (["--lr", "inf"], "--lr: must be a finite number >= 0, got inf"),
    (["--disp-tau", "0"], "--disp-tau: must be a finite number > 0, got 0"),
    (["--disp-tau", "x"], "--disp-tau: must be a finite number > 0, got 'x'"),
    (["--disp-variant", "hinge", "--disp-tau", "1"], "--disp-tau: the hinge variant has no temperature"),
    (["--disp-variant", "covariance", "--disp-tau", "2"], "--disp-tau: the covariance variant has no temperature"),
    (["--disp-group-size", "3"], "--disp-group-size 3 does not divide the batch of 8 per process"),
    (["--accum-steps", "3"], "--batch-size 8 does not split into 1 process(es) x 3 micro-batches (--accum-steps) x 1 view"),
    (["--accum-steps", "4"], "--disp-group-size 4 does not divide the micro-batch of 2 per process"),
    (["--accum-steps", "0"], "--accum-steps: must be an integer >= 1, got 0"),
    (["--adam-beta2", "1"], "--adam-beta2: must be a finite number >= 0 and < 1, got 1"),
    (["--model", "DiT-Huge/2"], "invalid choice: 'DiT-Huge/2'"),
    (["--disp-variant", "nope"], "invalid choice: 'nope'"),
    (["--resume", "/nonexistent/run"], "no such file or run directory"),
    (["--p-uncond", "1.5"], "--p-uncond: must be a finite number >= 0 and <= 1, got 1.5"),
    (["--image-size", "-4"], "--image-size: must be an integer >= 1, got -4"),
    (["--ckpt-every", "0"], "--ckpt-every: must be an integer >= 1, got 0"),
    (["--disp-weigh", "0.9"], "unrecognized arguments: --disp-weigh 0.9"),     # no prefixes: ab.py passes flags on
    (["--unconditional", "--sample-cfg", "4"], "--sample-cfg: an --unconditional model takes no labels"),
    (["--unconditional", "--p-uncond", "0.2"], "--p-uncond: an --unconditional model has no labels to drop"),
    (["--fid-ref-stats", "x.npz"], "--fid-ref-stats: flags of the periodic FID, which only --fid-every N turns on"),
    (["--sample-solver", "heun"], "--sample-solver: flags of the grids and the periodic FID, and --sample-every 0 "),
    (["--batch-size", "100000", "--disp-group-size", "0"], "--batch-size 100000 is larger than the data set"),
    (["--device", "xpu"], "unknown --device 'xpu'"),
])
def test_bad_flags(image_folder, tmp_path, flags, message, capsys):
    """In this process (a subprocess per case cost 3-10 s): run_main's exit status 2 and the last
    line on stderr. test_bad_flags_in_a_subprocess shows that the user sees no traceback."""
    with pytest.raises(SystemExit) as exit:
        run_main(lambda: train.main(tiny_args(image_folder, tmp_path / "o", "--steps", "1", *flags)))
    assert exit.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "o").exists()        # a run that never started leaves no directory behind


@pytest.mark.parametrize("flags,message", [
    (["--batch-size", "0"], "--batch-size: must be an integer >= 1, got 0"),
    (["--image-size", "4"], "--image-size: must be an integer >= 8, got 4"),
    (["--num-workers", "-1"], "--num-workers: must be an integer >= 0, got -1"),
])
def test_encode_latents_bad_flags(image_folder, tmp_path, flags, message, capsys):
    import encode_latents          # its flags are checked before diffusers is needed
    with pytest.raises(SystemExit) as exit:
        run_main(lambda: encode_latents.main(["--data-path", str(image_folder), "--out", str(tmp_path / "o"), *flags]))
    assert exit.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "o").exists()


def test_bad_flags_in_a_subprocess(image_folder, tmp_path):
    assert "--disp-weight: must be a finite number >= 0, got -1" in bad(
        tmp_path, *tiny_args(image_folder, tmp_path / "o", "--steps", "1", "--disp-weight", "-1"))
    assert "--disp-group-size 3 does not divide" in bad(
        tmp_path, *tiny_args(image_folder, tmp_path / "o", "--steps", "1", "--disp-group-size", "3"))


def test_a_gpu_index_the_machine_lacks_is_one_line(monkeypatch):
    """Else the first tensor moved to cuda:7 fails deep inside PyTorch ("invalid device ordinal")."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match=r"^--device cuda:7: this machine has 1 CUDA GPU, cuda:0$"):
        pick_device("cuda:7")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UserError, match=r"has 2 CUDA GPUs, cuda:0 to cuda:1$"):
        pick_device("cuda:2")
    assert pick_device("cuda:1") == torch.device("cuda:1")
    assert pick_device("cuda") == torch.device("cuda")


def test_running_out_of_memory_is_one_line(capsys):
    """A real allocation failure (128 TiB, more than a process can address): one line, exit status 1."""
    with pytest.raises(SystemExit) as exit:
        run_main(lambda: torch.empty(2 ** 45, dtype=torch.float32))
    assert exit.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: out of memory (") and err.endswith("; try a smaller --batch-size\n")
    assert err.count("\n") == 1
    def raises(error):
        def main():
            raise error
        return main
    with pytest.raises(SystemExit) as exit:      # CUDA's own kind, as the GPU raises it
        run_main(raises(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nOf the allocated ...")))
    assert exit.value.code == 1
    assert capsys.readouterr().err == ("error: out of memory (CUDA out of memory. Tried to allocate 2.00 GiB.); "
                                       "try a smaller --batch-size\n")
    with pytest.raises(RuntimeError, match="not about memory"):      # any other RuntimeError is a bug: its traceback
        run_main(raises(RuntimeError("not about memory")))


def test_unwritable_output_and_existing_run(image_folder, tmp_path):
    (tmp_path / "file").write_text("x")
    assert "cannot write to --out" in bad(tmp_path, *tiny_args(image_folder, tmp_path / "file" / "run", "--steps", "1"))
    # an empty --out (an unset $OUT) would be the current directory: the repository's root here
    assert "--out '': give a directory" in bad(tmp_path, *tiny_args(image_folder, "", "--steps", "1"))
    assert not os.path.exists(os.path.join(ROOT, "metrics.jsonl"))
    out = tmp_path / "run"
    train.main(tiny_args(image_folder, out, "--steps", "2"))
    before = open(list_checkpoints(out)[0], "rb").read()
    assert "already has checkpoints" in bad(tmp_path, *tiny_args(image_folder, out, "--steps", "2"))
    assert open(list_checkpoints(out)[0], "rb").read() == before


def test_batch_size_one_warns(image_folder, tmp_path):
    r = run_script("train.py", *tiny_args(image_folder, tmp_path / "o", "--steps", "1", "--batch-size", "1",
                                          "--disp-group-size", "0"))
    assert r.returncode == 0 and "dispersive loss of 1 sample is constant" in r.stderr


def test_sample_missing_checkpoint(tmp_path):
    assert "does not exist" in bad(tmp_path, "--ckpt", str(tmp_path / "none.pt"), script="sample.py")
