"""Every command the documentation shows still parses: the README, docs/*.md and the scripts'
docstrings (their --help) give about 80 command lines, and a renamed or removed flag would
otherwise leave them wrong without any test noticing. Each command is parsed by its script's own
argument parser (train.py's, ab.py's and bench.py's also run their checks of flag combinations);
nothing is trained or loaded. The GPU scripts (docs/gpu_*.sh) are walked through the same way, at the end."""
import ast
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT
from parse_only import parse
from utils import UserError

# `python X.py ...` at the start of a line (a code block, `$ ` or not) or in `backticks`;
# torchrun's launcher flags before train.py are its own, not ours
COMMAND = re.compile(r"(?:^\s*(?:\$ )?|`)(?:python3? |torchrun [^`]*?)(\w+\.py)\b([^`#]*)")
# placeholders the prose uses: dropped, or replaced by a value (N: a number of steps; "..." after
# a flag: its value, as in `--ckpt ...`)
DROPPED = {"...", "FLAGS", "$P"}
VALUES = {"N": "100"}


def fill(tokens):
    out = []
    for t in tokens:
        if t == "..." and out and out[-1].startswith("--"):
            out.append("PLACEHOLDER")
        elif t not in DROPPED:
            out.append(VALUES.get(t, t))
    return out


def documented_commands():
    """(where, script, argv) for every command line in the docs and the scripts' docstrings."""
    sources = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
    texts = [(os.path.relpath(f, ROOT), open(f).read()) for f in sources]
    for f in sorted(glob.glob(os.path.join(ROOT, "*.py"))):
        texts.append((os.path.basename(f), ast.get_docstring(ast.parse(open(f).read())) or ""))
    found = []
    for where, text in texts:
        # a code line continued by "\", or an inline `command` that runs on over a line break
        text = re.sub(r"\\\n", " ", text)
        text = re.sub(r"`[^`]*`", lambda m: m.group(0).replace("\n", " "), text)
        for line in text.splitlines():
            for m in COMMAND.finditer(line):
                argv = fill(shlex.split(m.group(2)))
                found.append((f"{where}: {m.group(0).strip()}", m.group(1), argv))
    return found


COMMANDS = documented_commands()


def test_the_docs_show_commands():
    """The extraction finds the commands (a broken pattern would make the test below pass on nothing)."""
    scripts = {script for _, script, _ in COMMANDS}
    assert len(COMMANDS) >= 60
    assert {"train.py", "sample.py", "ab.py", "fid.py", "probe.py", "plots.py", "bench.py"} <= scripts
    assert any(where.startswith("README.md") and argv == ["--disp-weight", "0.5"] for where, _, argv in COMMANDS)


@pytest.mark.parametrize("where,script,argv", COMMANDS, ids=[c[0][:90] for c in COMMANDS])
def test_documented_command_parses(where, script, argv, capsys):
    if script not in {os.path.basename(f) for f in glob.glob(os.path.join(ROOT, "*.py"))}:
        pytest.fail(f"{where}: there is no {script}")
    try:
        parse(script, argv)
    except SystemExit as e:     # argparse's error (exit 2), or --help (exit 0)
        err = capsys.readouterr().err.strip().splitlines()[-1:]
        elided = "..." in where and err and "arguments are required" in err[0]     # `X.py ... --flag`
        if e.code != 0 and not elided:
            pytest.fail(f"{where}: {err} (exit {e.code})")
    except UserError as e:      # a script's checks of its flags (get_args: train.py, ab.py, bench.py)
        if not ("..." in where and str(e).startswith("give --steps")):    # `ab.py --flag ...`: elided
            pytest.fail(f"{where}: {e}")


# The GPU scripts: a device session is rare and short, and a flag the code no longer takes would
# waste it. Each script is walked through with python3 replaced by tests/parse_only.py, which
# parses every project command the script runs (and leaves the file the script looks for next).

needs_timeout = pytest.mark.skipif(shutil.which("timeout") is None, reason="the GPU scripts use GNU timeout")


def walk_gpu_script(name, tmp_path, *args, **env):
    """[(script, argv)] of the project commands docs/<name> runs, each parsed by its own parser;
    env sets the script's variables (those of the caller's environment are dropped)."""
    script = os.path.join(ROOT, "docs", name)
    log, python = tmp_path / "parsed.jsonl", tmp_path / "python3"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{os.path.join(ROOT, "tests", "parse_only.py")}" "$@"\n')
    python.chmod(0o755)
    own = set(re.findall(r"\$\{(\w+)", open(script).read()))          # STEPS, MODEL, DEVICE, ...
    env = {**{k: v for k, v in os.environ.items() if k not in own}, "PYTHON": str(python), "PARSE_LOG": str(log),
           "WORK": str(tmp_path / "work"), "CIFAR_DIR": str(tmp_path / "cifar"), **env}
    run = subprocess.run(["bash", script, str(tmp_path / "out"), *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stdout + run.stderr
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    refused = [rec for rec in records if "error" in rec]
    assert not refused, f"docs/{name}: commands its scripts refuse: {refused}"
    return [(rec["script"], rec["argv"]) for rec in records]


def flag(argv, name):
    return argv[argv.index(name) + 1]


@pytest.mark.slow     # tens of seconds: each command imports the project afresh
@needs_timeout
def test_gpu_ab_script_commands_parse(tmp_path):
    (tmp_path / "cifar" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "cifar" / "train" / "cat" / "0001.jpg").touch()     # counted, never read
    ran = walk_gpu_script("gpu_ab.sh", tmp_path, "unused.zip", TRAIN_FLAGS="--adam-beta2 0.95 --grad-clip 0")
    assert sorted(s for s, _ in ran[:3]) == ["fid.py", "train.py", "train.py"]   # at once: in any order
    assert [s for s, _ in ran[3:]] == ["ab.py", "ab.py"]                     # the scores and the probe, at once
    arms = {os.path.basename(flag(a, "--out")): a for s, a in ran if s == "train.py"}
    assert {arm: flag(a, "--disp-weight") for arm, a in arms.items()} == {"baseline": "0", "dispersive": "0.5"}
    assert len(arms["baseline"]) == len(arms["dispersive"])
    differ = {arms["baseline"][i - 1] for i, (b, d) in enumerate(zip(*arms.values())) if b != d}
    assert differ == {"--disp-weight", "--out"}          # the same seed, steps and every other flag
    assert all("--compile" in a and flag(a, "--steps") == "2800" for a in arms.values())
    assert all(flag(a, "--adam-beta2") == "0.95" and flag(a, "--grad-clip") == "0" for a in arms.values())
    assert sorted("--probe" in a for s, a in ran if s == "ab.py") == [False, True]
    summary = (tmp_path / "out" / "ab.md").read_text()    # written by the script's own python (not parsed)
    assert "no training log" in summary and "FD-classifier-10000" in summary


@pytest.mark.slow
@needs_timeout
def test_gpu_checks_script_commands_parse(tmp_path):
    with zipfile.ZipFile(tmp_path / "c.zip", "w") as z:
        z.writestr("train/cat/0001.jpg", b"")
    # every check the script has (its case labels: a fork that deletes MeanFlow deletes s2_meanflow)
    checks = re.findall(r"^    (\w+)\)", open(os.path.join(ROOT, "docs", "gpu_checks.sh")).read(), re.M)
    assert {"s2", "b2", "train", "b2_autotune", "s2_autotune", "s2_accum"} <= set(checks)
    ran = dict(zip(checks, walk_gpu_script("gpu_checks.sh", tmp_path, str(tmp_path / "c.zip"), CHECKS=" ".join(checks))))
    assert len(ran) == len(checks)      # one command each
    assert {c: (s, flag(a, "--model")) for c, (s, a) in ran.items() if c != "s2_meanflow"} == {
        "s2": ("bench.py", "DiT-S/2"), "b2": ("bench.py", "DiT-B/2"), "train": ("train.py", "DiT-S/2"),
        "b2_autotune": ("bench.py", "DiT-B/2"), "s2_autotune": ("bench.py", "DiT-S/2"),
        "s2_accum": ("bench.py", "DiT-S/2")}
    assert flag(ran["train"][1], "--data-path") == str(tmp_path / "cifar" / "train")
    assert flag(ran["s2_accum"][1], "--accum-steps") == "4"     # s2's batch of 256, in micro-batches of 64
    for c in ("b2_autotune", "s2_autotune"):
        assert flag(ran[c][1], "--compile-mode") == "max-autotune-no-cudagraphs"
    assert flag(ran["s2_autotune"][1], "--sample-batches") == "2"     # it times sampling too


def test_help_shows_every_default_including_zero(capsys):
    """utils.HelpFormatter adds "(default: X)" to each flag's help: a default of 0 too (the
    paper's weight decay; 0 == False in Python, which once hid it), but not a switch's False."""
    import train
    with pytest.raises(SystemExit):
        train.get_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())     # argparse's line wrapping undone
    assert "AdamW weight decay (the paper's: 0) (default: 0.0)" in text
    assert "seed for the weights, data order and noise (default: 0)" in text
    assert "torch.compile the model (GPU: faster after a minute) --device" in text    # a switch: no default shown
