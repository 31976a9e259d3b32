"""Parse a command line with its script's own argument parser, and do nothing else.

- `parse(script, argv)` is what tests/test_docs.py checks every documented command with.
- Run as a program, this file stands in for python3 in the GPU scripts (docs/gpu_*.sh, their
  PYTHON set to a wrapper that runs it), so that a test walks through a whole script in seconds
  and finds a flag the code no longer takes before a rare GPU session does:
  - a project script's command line is parsed, appended to $PARSE_LOG as one JSON line, and
    stands in for its run by leaving the one file the script looks for next (an empty checkpoint,
    a classifier's metadata);
  - anything else (`-c`, `-m zipfile`, `-` for a here-document) runs in the real python.
"""
import argparse
import importlib
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Parsed(Exception):
    pass


def parse(script, argv):
    """The namespace script's parser makes of argv (ab.py: also its train.py flags after "--",
    parsed by train.py's parser). argparse's own SystemExit (an error: 2; --help: 0) goes through,
    and so does the UserError of a script's checks of its flags, where it has them (get_args)."""
    module = importlib.import_module(script[:-3])
    if hasattr(module, "get_args"):         # train.py, ab.py, bench.py: the parser and the checks after it
        args = module.get_args(argv)
        return args[0] if script == "ab.py" else args     # ab.py's: (args, train.py's args, arms)
    original = argparse.ArgumentParser.parse_args

    def stop(self, *args, **kwargs):        # main() stops right after parsing
        raise Parsed(original(self, *args, **kwargs))
    argparse.ArgumentParser.parse_args = stop
    try:
        module.main(argv)
    except Parsed as p:
        return p.args[0]
    finally:
        argparse.ArgumentParser.parse_args = original
    raise AssertionError(f"{script}: main() returned without parsing its arguments")


def leave_outputs(script, args):
    """The file a run of script would leave that the GPU scripts test for before going on."""
    if script == "train.py":
        os.makedirs(os.path.join(args.out, "checkpoints"), exist_ok=True)
        open(os.path.join(args.out, "checkpoints", f"step_{args.steps:07d}.pt"), "w").close()
    if script == "fid.py" and args.train_classifier:     # what gpu_ab.sh's summary reads of it
        import torch
        torch.save({"held_out_accuracy": 0.0, "epochs": 0}, args.train_classifier)


def main():
    script, argv = sys.argv[1], sys.argv[2:]
    if not (script.endswith(".py") and os.path.exists(os.path.join(ROOT, script))):
        os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
    sys.path.insert(0, ROOT)
    record = {"script": script, "argv": argv}
    try:
        args = parse(script, argv)
    except BaseException as e:      # argparse's exit, or train.py's UserError
        record["error"] = f"exit {e.code}" if isinstance(e, SystemExit) else f"{type(e).__name__}: {e}"
        raise
    finally:
        with open(os.environ["PARSE_LOG"], "a") as f:
            f.write(json.dumps(record) + "\n")
    leave_outputs(script, args)


if __name__ == "__main__":
    main()
