"""Small shared pieces: user-facing errors, devices, checkpoint files, signals and the metrics log.

Checkpoints are plain dicts of tensors, numbers and strings, so they load with
torch.load(weights_only=True) (the default since PyTorch 2.6), which runs no code from the
file. They are written atomically: to a temporary file in the same directory, flushed to
disk, then renamed over the final name, so a crash leaves either the old file or the new
one, never half of one.
"""
import contextlib
import glob
import json
import os
import pickle
import re
import signal
import sys

import torch


class UserError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


def run_main(main):
    """Call main(); turn UserError (and data errors) into one line on stderr and exit 2."""
    from data import DataError
    try:
        main()
    except (UserError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def pick_device(name="auto"):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was asked for but MPS is not available; use --device cpu")
    return dev


def autocast(device):
    """bf16 autocast on CUDA; a no-op elsewhere (CPU bf16 is slow, MPS support is partial)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------
# Checkpoint files
# ----------------------------------------------------------------------------------------

CKPT_RE = re.compile(r"step_(\d+)\.pt$")


def save_atomic(obj, path):
    """torch.save to path.tmp, fsync, rename. On failure (disk full, permissions) the
    temporary file is removed, the previous checkpoints are untouched, and a UserError says so."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(dfd)                # make the rename itself durable
        finally:
            os.close(dfd)
    except (OSError, RuntimeError) as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise UserError(f"could not write checkpoint {path!r} ({e}); earlier checkpoints are intact") from None


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint safely (weights_only=True) with one-line errors."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path!r} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # unsafe, truncated or foreign files
        unsafe = [l.strip() for l in str(e).splitlines() if "Unsupported global" in l]
        if isinstance(e, pickle.UnpicklingError) and unsafe:
            raise UserError(f"refusing to load {path!r}: it holds pickled Python objects, which could run code "
                            f"when loaded ({unsafe[0].split(' was not')[0]})") from None
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"cannot read checkpoint {path!r} (damaged or not a checkpoint): {type(e).__name__} {first}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise UserError(f"{path!r} is not a checkpoint written by train.py (no 'model' / 'model_config' entries)")
    return ckpt


def list_checkpoints(run_dir):
    """Complete checkpoints in run_dir/checkpoints, newest first (temporary files are ignored)."""
    found = []
    for p in glob.glob(os.path.join(run_dir, "checkpoints", "step_*.pt")):
        m = CKPT_RE.search(p)
        if m:
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found, reverse=True)]


def find_resume_checkpoint(path):
    """--resume PATH: a checkpoint file, or a run directory whose newest readable checkpoint is used."""
    if os.path.isfile(path):
        return path, load_checkpoint(path)
    if not os.path.isdir(path):
        raise UserError(f"--resume {path!r}: no such file or run directory")
    for p in list_checkpoints(path):
        try:
            return p, load_checkpoint(p)
        except UserError as e:
            print(f"warning: skipping unreadable checkpoint ({e})", file=sys.stderr)
    raise UserError(f"--resume {path!r}: no checkpoint found in {os.path.join(path, 'checkpoints')}")


def build_from_checkpoint(ckpt, weights="ema"):
    """Rebuild the model a checkpoint describes and load its EMA (default) or raw weights."""
    from model import build_model
    cfg = ckpt["model_config"]
    model = build_model(cfg["name"], cfg["image_size"], cfg["in_channels"], cfg["num_classes"],
                        mean_flow=cfg.get("objective", "flow") == "meanflow")
    if weights not in ckpt:
        raise UserError(f"the checkpoint has no {weights!r} weights")
    state = ckpt[weights]
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"checkpoint weights do not fit {cfg['name']}: {str(e).splitlines()[0]}") from None
    return model


@contextlib.contextmanager
def stop_on_signals():
    """SIGINT (Ctrl-C) and SIGTERM (a scheduler pre-empting the job) only raise a flag; the
    loop finishes its step, saves a checkpoint and exits cleanly. Handlers are restored after."""
    stop = {"signal": None}

    def on_signal(signum, frame):
        if stop["signal"] is not None:      # a second Ctrl-C: give up at once, without saving
            raise KeyboardInterrupt
        stop["signal"] = signal.Signals(signum).name
        print(f"\n{stop['signal']}: finishing this step and saving a checkpoint (again to quit without saving)",
              file=sys.stderr)
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class Logger:
    """metrics.jsonl in the run directory; rank 0 only."""

    def __init__(self, path, enabled, keep_until_step=None):
        self.enabled, self.path = enabled, path
        if enabled and keep_until_step is not None and os.path.exists(path):
            # Resuming: drop what the interrupted run logged after its last checkpoint, so
            # the log reads as one uninterrupted run.
            with open(path) as f:
                lines = [l for l in f if self._keep(l, keep_until_step)]
            with open(path + ".tmp", "w") as f:
                f.writelines(lines)
            os.replace(path + ".tmp", path)

    @staticmethod
    def _keep(line, until):
        try:
            return json.loads(line).get("step", 0) <= until
        except ValueError:        # a line torn by a kill in mid-write
            return False

    def __call__(self, **record):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
