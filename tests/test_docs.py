"""Every command the documentation shows still parses: the README, docs/*.md and the scripts'
docstrings (their --help) give about 80 command lines, and a renamed or removed flag would
otherwise leave them wrong without any test noticing. Each command is parsed by its script's own
argument parser (train.py's also runs its checks of flag combinations); nothing is trained,
loaded or written."""
import argparse
import ast
import glob
import importlib
import os
import re
import shlex

import pytest

from conftest import ROOT

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


class Parsed(Exception):
    pass


def parse(script, argv, monkeypatch):
    """Parse argv with the script's parser, stopping main() right after it (ab.py: and the train.py
    flags after its "--" with train.py's parser)."""
    if script == "train.py":
        import train
        train.get_args(argv)                # the parser and the checks that follow it
        return
    module = importlib.import_module(script[:-3])
    method = "parse_known_args" if script == "ab.py" else "parse_args"   # ab.py leaves train.py's flags over
    original = getattr(argparse.ArgumentParser, method)

    def stop(self, *args, **kwargs):
        raise Parsed(original(self, *args, **kwargs))
    monkeypatch.setattr(argparse.ArgumentParser, method, stop)
    with pytest.raises(Parsed) as result:
        module.main(argv)
    monkeypatch.undo()
    if script == "ab.py":
        import train
        train.get_args([a for a in result.value.args[0][1] if a != "--"])


def test_the_docs_show_commands():
    """The extraction finds the commands (a broken pattern would make the test below pass on nothing)."""
    scripts = {script for _, script, _ in COMMANDS}
    assert len(COMMANDS) >= 60
    assert {"train.py", "sample.py", "ab.py", "fid.py", "probe.py", "plots.py", "bench.py"} <= scripts
    assert any(where.startswith("README.md") and argv == ["--disp-weight", "0.5"] for where, _, argv in COMMANDS)


@pytest.mark.parametrize("where,script,argv", COMMANDS, ids=[c[0][:90] for c in COMMANDS])
def test_documented_command_parses(where, script, argv, monkeypatch, capsys):
    if script not in {os.path.basename(f) for f in glob.glob(os.path.join(ROOT, "*.py"))}:
        pytest.fail(f"{where}: there is no {script}")
    try:
        parse(script, argv, monkeypatch)
    except SystemExit as e:     # argparse's error (exit 2), or --help (exit 0)
        err = capsys.readouterr().err.strip().splitlines()[-1:]
        elided = "..." in where and err and "arguments are required" in err[0]     # `X.py ... --flag`
        if e.code != 0 and not elided:
            pytest.fail(f"{where}: {err} (exit {e.code})")
