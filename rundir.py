"""The run directory and what keeps it safe: checkpoint files, resume, the metrics log, signals.

    RUN/metrics.jsonl       the configuration first, then one JSON line per log step
    RUN/samples/            grids of EMA samples
    RUN/checkpoints/step_XXXXXXX.pt
    RUN/.lock               held by the process training there (one process per run directory)

Checkpoints are plain dicts of tensors, numbers and strings, so they load with
torch.load(weights_only=True) (the default since PyTorch 2.6), which runs no code from the
file. They are written atomically: to a temporary file in the same directory, flushed to disk,
then renamed over the final name, so a crash leaves the old file or the new one, never half of one.
"""
import contextlib
import errno
import glob
import json
import os
import pickle
import re
import signal
import sys
import time

import torch

try:
    import fcntl            # the run directory's lock (Linux, macOS); without it, no lock
except ImportError:
    fcntl = None

from loss import USES_TAU, parse_blocks
from utils import UserError, all_reduce, atomic_output, first_line, writable_dir

CKPT_RE = re.compile(r"step_(\d+)\.pt$")
# Flags that change where and how often a run writes, or how it computes, not what it trains:
# changing them on --resume is expected, so it draws no warning.
PLUMBING = {"out", "resume", "compile", "device", "accum_steps", "log_every", "sample_every", "sample_solver", "sample_steps",
            "sample_cfg", "ckpt_every", "keep_ckpts", "steps", "data_path", "fid_every", "fid_samples", "fid_ref_stats",
            "fid_extractor", "inception_weights"}


# The plumbing flags that set how the periodic FID measures: changed on --resume, its values after
# the resumed step are of another measure than those before, though metrics.jsonl holds them as one.
FID_MEASURE = ("sample_solver", "sample_steps", "sample_cfg", "fid_samples", "fid_ref_stats", "fid_extractor",
               "inception_weights")


def changed_flags(saved, now, depth=None):
    """The train.py arguments (names) of a saved run that another set, now, gives other values,
    the plumbing aside: both are dicts of train.py's arguments. Two values that train the same
    run are no change: --disp-block's, given the model's depth, compared as the blocks they name
    (unset and 1 on 4 blocks), and --disp-tau's for a variant without a temperature (runs from
    before train.py refused that flag there)."""
    variant = saved.get("disp_variant", "infonce_l2")
    tau_free = variant not in USES_TAU and now.get("disp_variant", variant) == variant

    def same(k, a, b):
        if k == "disp_block" and depth is not None:
            blocks = lambda spec: parse_blocks(None if spec is None else str(spec), depth)
            try:
                return blocks(a) == blocks(b)
            except UserError:       # a hand-edited value: compared as it is
                pass
        return (k == "disp_tau" and tau_free) or a == b
    return [k for k, v in saved.items() if k not in PLUMBING and not same(k, v, now.get(k, v))]


# ----------------------------------------------------------------------------------------
# Checkpoint files
# ----------------------------------------------------------------------------------------

def save_atomic(obj, path):
    """torch.save through utils.atomic_output: on failure (disk full, permissions) the previous
    checkpoints are untouched, and a UserError says so."""
    with atomic_output(path, f"checkpoint {path!r}", "; earlier checkpoints are intact") as f:
        torch.save(obj, f)


# What each entry of a checkpoint is, and the least value of the numbers. train.py writes them all;
# load_checkpoint requires 'model' and 'model_config'; sample.py samples 'ema' unless --raw-weights;
# --resume needs the rest.
ENTRY_TYPES = {"model": dict, "model_config": dict, "ema": dict, "opt": dict, "step": int, "rng": dict,
               "args": dict, "world_size": int, "classes": list, "data_size": int}
LEAST = {"step": 0, "world_size": 1, "data_size": 0}


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint safely (weights_only=True) with one-line errors, also for a file whose
    entries are not of the kinds train.py writes (hand-edited, or written by other code)."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path!r} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # unsafe, truncated or foreign files
        unsafe = [l.strip() for l in str(e).splitlines() if "Unsupported global" in l]
        if isinstance(e, pickle.UnpicklingError) and unsafe:
            raise UserError(f"refusing to load {path!r}: it holds pickled Python objects, which could run code "
                            f"when loaded ({unsafe[0].split(' was not')[0]})") from None
        first = first_line(e)
        if isinstance(e, pickle.UnpicklingError):   # torch's text here is about weights_only, not this file
            first = "not a file torch.save wrote"
        raise UserError(f"cannot read checkpoint {path!r} (damaged or not a checkpoint): {type(e).__name__} {first}") from None
    if not isinstance(ckpt, dict) or ckpt.get("model") is None or ckpt.get("model_config") is None:
        raise UserError(f"{path!r} is not a checkpoint written by train.py (no 'model' / 'model_config' entries)")
    # an entry set to None (a checkpoint slimmed for sharing: ck["opt"] = None) counts as absent
    ckpt = {k: v for k, v in ckpt.items() if not (k in ENTRY_TYPES and v is None)}
    for key, kind in ENTRY_TYPES.items():
        value, least = ckpt.get(key), LEAST.get(key)
        if value is None:
            continue
        if not isinstance(value, kind) or (least is not None and value < least):
            wanted = f"a {kind.__name__}" if least is None else f"an int >= {least}"
            raise UserError(f"checkpoint {path!r} is not as train.py writes it: its {key!r} is {type(value).__name__} "
                            f"{repr(value)[:60]}, not {wanted}")
    return ckpt


def list_checkpoints(run_dir):
    """Complete checkpoints in run_dir/checkpoints, newest first (temporary files are ignored)."""
    found = []
    for p in glob.glob(os.path.join(run_dir, "checkpoints", "step_*.pt")):
        m = CKPT_RE.search(p)
        if m:
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found, reverse=True)]


def checkpoint_step(path):
    return int(CKPT_RE.search(path).group(1))


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


def resolve_checkpoint(path):
    """A checkpoint file, or a run directory's newest checkpoint."""
    if os.path.isdir(path):
        found = list_checkpoints(path)
        if not found:
            raise UserError(f"no checkpoint in {os.path.join(path, 'checkpoints')}")
        return found[0]
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path!r} does not exist")
    return path


def save_checkpoint(run_dir, step, state, keep):
    """Write step's checkpoint, then delete all but the `keep` newest (0: keep all) up to this
    step. One above it is a damaged file that --resume skipped for an older one: left alone
    (this run overwrites it when it gets there), it must not count as one of the newest, or
    the pruning would delete the checkpoint just written and keep only the damaged one."""
    path = os.path.join(run_dir, "checkpoints", f"step_{step:07d}.pt")
    save_atomic(state, path)
    ours = [p for p in list_checkpoints(run_dir) if checkpoint_step(p) <= step]
    for old in ours[keep:] if keep else []:
        os.remove(old)
    return path


# ----------------------------------------------------------------------------------------
# Starting and resuming a run
# ----------------------------------------------------------------------------------------

def run_of(checkpoint_file):
    """The run directory a checkpoint file lies in (RUN/checkpoints/x.pt), or None."""
    parent = os.path.dirname(os.path.normpath(checkpoint_file))
    return os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else None


def out_from_resume(resume):
    """--resume RUN_DIR (or RUN_DIR/checkpoints/x.pt) without --out continues that run directory."""
    path = os.path.normpath(resume)
    if not os.path.isfile(path):
        return path
    if run_of(path) is None:
        raise UserError(f"--resume {resume!r} is a checkpoint outside a run directory; say where the run continues "
                        f"with --out")
    return run_of(path)


def prepare(out, resume):
    """Check the run directory before anything is loaded or built; create nothing yet, so that a
    run that fails to start leaves no empty directory behind. Returns (checkpoint path,
    checkpoint, own, seen): the checkpoint to resume from, or None, None and False for a fresh run,
    which must not land on an existing run's checkpoints; own is true when the checkpoint is out's
    own (the run continues its history there), false when it comes from another run directory;
    seen, out's checkpoints now, which create() checks again once it holds the lock."""
    writable_dir(out)
    resume_path, ckpt, own = None, None, False
    if resume is not None:
        resume_path, ckpt = find_resume_checkpoint(resume or out)
        missing = [k for k in ("ema", "opt", "step", "rng", "args") if k not in ckpt]
        if missing:
            raise UserError(f"checkpoint {resume_path!r} has no {', '.join(missing)}: it cannot continue a training "
                            f"run (sample.py and fid.py can still use its weights)")
        source = run_of(resume_path)
        own = source is not None and os.path.realpath(source) == os.path.realpath(out)
        if not own and list_checkpoints(out):
            # Its log would be trimmed to the step resumed from, and its own checkpoints pruned
            # or overwritten by this run's: two runs' histories in one directory.
            raise UserError(f"--out {out!r} holds checkpoints of its own run; continuing {resume_path!r} there "
                            f"would mix the two runs: choose an empty --out (or --resume {out!r})")
        newer = [p for p in list_checkpoints(out) if checkpoint_step(p) > ckpt["step"]]
        if newer and os.path.isfile(resume):
            # Continuing from an older file would interleave two histories in one directory
            # (and the newest-first pruning could delete what this run writes).
            raise UserError(f"{out!r} has checkpoints newer than {resume_path!r} ({newer[0]}); move them "
                            f"away to restart from the older one, or choose another --out")
    elif list_checkpoints(out):
        raise UserError(f"run directory {out!r} already has checkpoints; add --resume to continue it, "
                        f"or choose another --out")
    return resume_path, ckpt, own, list_checkpoints(out)     # the last: for create() to check again, under the lock


_locks = {}     # run directory -> the open lock file that holds it, for as long as this process trains there


def lock(out):
    """Hold out/.lock (an advisory lock): a second process started into the same run directory
    stops here, before it touches the first one's files. train.py releases it when the run ends;
    a run that fails keeps it until its process ends, or until this process locks out again."""
    release(out)
    f = open(os.path.join(out, ".lock"), "w")
    try:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):     # a file system without locks: go on without
            print(f"warning: cannot lock {out!r} ({e.strerror}); nothing stops a second run there", file=sys.stderr)
        else:
            f.close()
            raise UserError(f"another process is training into --out {out!r} (it holds {os.path.join(out, '.lock')}); "
                            f"wait for it, stop it, or choose another --out") from None
    _locks[os.path.realpath(out)] = f


def release(out):
    f = _locks.pop(os.path.realpath(out), None)
    if f is not None:
        f.close()


def create(out, new_log, main_proc, seen=None):
    """Create the run directory (just before the first line of the log) and lock it: its
    subdirectories, minus the temporary files of a process that was killed mid-write. A run that
    starts a log of its own (new_log: a fresh run, or one continued from another run directory)
    moves an old metrics.jsonl aside rather than append to it. Checks that the checkpoints and
    the log can be written, now rather than at the first checkpoint, and that no other run wrote
    checkpoints there since prepare() saw `seen` (while this one loaded its data)."""
    if not main_proc:
        return
    log_path = os.path.join(out, "metrics.jsonl")
    try:
        for sub in ("checkpoints", "samples"):
            os.makedirs(os.path.join(out, sub), exist_ok=True)
        lock(out)
        if seen is not None and list_checkpoints(out) != seen:
            raise UserError(f"--out {out!r}: another run wrote checkpoints there while this one was starting; "
                            f"start again (with --resume to continue it) or choose another --out")
        probe = os.path.join(out, "checkpoints", f".write_test{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
        for tmp in glob.glob(os.path.join(out, "checkpoints", "*.tmp*")):
            os.remove(tmp)
        if new_log and os.path.exists(log_path):
            os.replace(log_path, os.path.join(out, f"metrics.{int(time.time())}.jsonl"))
        open(log_path, "a").close()
    except OSError as e:
        raise UserError(f"cannot write to --out {out!r}: {e.strerror}" + (f" ({e.filename})" if e.filename else "")) from None


def restore(ckpt, path, model, ema, opt, model_config, args, main_proc, world=1, data=None):
    """Load a checkpoint into model, EMA and optimiser (created before, unlike the released code)
    and the CPU random state. Refuses a checkpoint of another model, or one whose weights or
    optimiser state could not go on training; warns about changed flags and other data.
    Returns the step to continue from."""
    saved = {"objective": "flow", **ckpt["model_config"]}     # checkpoints from before MeanFlow
    for k, v in model_config.items():
        if saved.get(k) != v:
            raise UserError(f"checkpoint {path!r} does not match this run: its {k} is {saved.get(k)!r}, "
                            f"this run's is {v!r}")
    # AdamW's moments come from the checkpoint, its settings from this run's flags: load_state_dict
    # would bring back the saved betas and weight decay too, under a log that names the new ones
    settings = [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
    for key, load in (("model", model.load_state_dict), ("ema", ema.load_state_dict), ("opt", opt.load_state_dict),
                      ("rng", lambda rng: torch.set_rng_state(rng["torch"]))):
        try:
            load(ckpt[key])
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, ValueError, TypeError, KeyError) as e:  # damaged, hand-edited, or another model.py's
            detail = " ".join(l.strip() for l in str(e).splitlines() if l.strip())
            raise UserError(f"checkpoint {path!r} cannot continue this run: its {key!r}: {type(e).__name__} "
                            f"{detail[:300]}") from None
    for group, own_settings in zip(opt.param_groups, settings):
        group.update(own_settings)
    check_trainable(path, model, ema, opt)
    step = ckpt["step"]
    if main_proc:
        print(f"resumed from {path} at step {step}")
        changed = changed_flags(ckpt["args"], vars(args), model.depth)
        if changed:
            print(f"warning: resuming with changed {', '.join('--' + k.replace('_', '-') for k in changed)}: "
                  f"the run will not match an uninterrupted one", file=sys.stderr)
        if data is not None:
            warn_if_other_data(ckpt, data)
        saved_args = ckpt["args"]
        if args.fid_every and saved_args.get("fid_every"):      # a periodic FID before and after
            shown = lambda v: "unset" if v is None else v               # None: the objective's solver / steps
            measure = [f"--{k.replace('_', '-')} {shown(getattr(args, k))} (was {shown(saved_args[k])})"
                       for k in FID_MEASURE if k in saved_args and saved_args[k] != getattr(args, k)]
            if measure:
                print(f"warning: the periodic FID measures from step {step} with {', '.join(measure)}: its values "
                      f"before and after are two series, not one curve", file=sys.stderr)
        # with --disp-group-size 0 a dispersive group is what one forward pass holds: one process's
        # batch, or micro-batch under --accum-steps
        saved_world = ckpt.get("world_size", world)          # older checkpoints do not record it: no warning
        saved_batch = ckpt["args"].get("batch_size", args.batch_size)  # a hand-edited "8": the changed-flags warning
        saved_accum = ckpt["args"].get("accum_steps", 1)    # runs from before the flag: 1
        was = None                                           # a hand-edited value: no warning
        if isinstance(saved_batch, int) and isinstance(saved_accum, int) and saved_accum > 0:
            was = saved_batch // (saved_world * saved_accum)
        now = args.batch_size // (world * args.accum_steps)
        if args.disp_group_size == 0 and was not in (None, now):
            print(f"warning: with --disp-group-size 0 each dispersive group is one forward pass's batch: {was} samples "
                  f"in the run resumed ({saved_world} process(es) x {saved_accum} micro-batch(es)), {now} now "
                  f"({world} x {args.accum_steps}); the dispersive term changes", file=sys.stderr)
        if step >= args.steps:
            print(f"nothing to do: the checkpoint is at step {step} and --steps is {args.steps}")
    return step


def moments(opt):
    """(parameter number, name, tensor, parameter) for each of AdamW's per-parameter moments."""
    params = [p for group in opt.param_groups for p in group["params"]]
    return [(i, name, value, p) for i, p in enumerate(params) for name, value in opt.state.get(p, {}).items()
            if torch.is_tensor(value) and value.dim() > 0]      # not the step count


def not_finite(model, ema, opt):
    """What of the training state holds a NaN or inf ('model' weights, 'ema' weights, 'opt' exp_avg
    of parameter 3), or None. Checked before every checkpoint and after --resume loads one."""
    for key, module in (("model", model), ("ema", ema)):
        if not all(torch.isfinite(p).all() for p in module.parameters()):
            return f"{key!r} weights"
    for i, name, value, _ in moments(opt):
        if not torch.isfinite(value).all():
            return f"'opt' {name} of parameter {i}"
    return None


def check_trainable(path, model, ema, opt):
    """After loading: weights and AdamW moments that training could go on from. A NaN in the EMA
    would be saved again at every checkpoint; a moment of another shape would fail inside AdamW's
    first step, after the run directory was set up."""
    for i, name, value, p in moments(opt):
        if value.shape != p.shape:
            raise UserError(f"checkpoint {path!r} cannot continue this run: its 'opt' holds {name} of shape "
                            f"{tuple(value.shape)} for parameter {i}, of shape {tuple(p.shape)}")
    bad = not_finite(model, ema, opt)
    if bad:
        raise UserError(f"checkpoint {path!r} cannot continue this run: NaN or inf in its {bad}")


def warn_if_other_data(ckpt, data):
    """--data-path is plumbing (a data set moved elsewhere resumes without a warning), so the
    checkpoint records what it trained on, the number of samples and the class names, and
    other data draws a warning (older checkpoints recorded no size: it is not compared)."""
    size, classes = ckpt.get("data_size"), ckpt.get("classes")
    differ = [f"{len(data)} samples, not {size}"] if size is not None and size != len(data) else []
    if classes is not None and list(classes) != list(data.classes):
        first = next((i for i, (a, b) in enumerate(zip(classes, data.classes)) if a != b),
                     min(len(classes), len(data.classes)))
        shown = lambda names: repr(names[first]) if first < len(names) else "none"
        differ.append(f"class {first} is {shown(data.classes)}, not {shown(classes)}")
    if differ:
        print(f"warning: resuming on other data ({'; '.join(differ)}): the run will not match an uninterrupted one",
              file=sys.stderr)


# ----------------------------------------------------------------------------------------
# The metrics log, signals, and the non-finite guard
# ----------------------------------------------------------------------------------------

class Logger:
    """metrics.jsonl in the run directory, written by rank 0 only. On resume it first drops what
    the interrupted run logged after its last checkpoint, so the log reads as one uninterrupted run."""

    def __init__(self, path, enabled, keep_until_step=None):
        self.enabled, self.path = enabled, path
        if enabled and keep_until_step is not None and os.path.exists(path):
            lines = self._read()
            kept = [raw for raw, record in lines if record is not None and record.get("step", 0) <= keep_until_step]
            # a last line torn by a kill in mid-write (no newline) is expected; other lines that are
            # not train.py's records (hand-edited, or another program's) are dropped with a word
            torn = lines and not lines[-1][0].endswith(b"\n")
            foreign = sum(record is None for _, record in (lines[:-1] if torn else lines))
            if foreign:
                print(f"warning: {path!r}: dropping {foreign} line(s) that are not train.py's records "
                      f"(JSON objects with a numeric step)", file=sys.stderr)
            with atomic_output(path, f"the log {path!r}", mode="wb") as f:
                f.writelines(raw if raw.endswith(b"\n") else raw + b"\n" for raw in kept)

    def _read(self):
        """[(the line as bytes, its record or None)]: None for a line that is not a JSON object
        with a numeric step (torn, not UTF-8, another program's)."""
        with open(self.path, "rb") as f:
            lines = f.readlines()
        parsed = []
        for raw in lines:
            try:
                record = json.loads(raw.decode("utf-8"))
            except ValueError:          # UnicodeDecodeError is a ValueError too
                record = None
            step = record.get("step", 0) if isinstance(record, dict) else None
            ok = isinstance(step, (int, float)) and not isinstance(step, bool)
            parsed.append((raw, record if ok else None))
        return parsed

    def holds(self, **fields):
        """Whether the log has a record with these fields (e.g. type="fid", step=2000)."""
        return os.path.exists(self.path) and any(
            record is not None and all(record.get(k) == v for k, v in fields.items()) for _, record in self._read())

    def __call__(self, **record):
        if self.enabled:
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:
                raise UserError(f"could not write the log {self.path!r} ({e}); the checkpoints written "
                                f"so far are intact: make room, then continue with --resume") from None


@contextlib.contextmanager
def stop_on_signals():
    """SIGINT (Ctrl-C) and SIGTERM (a scheduler pre-empting the job) only raise a flag; the
    loop finishes its step, saves a checkpoint and exits cleanly. Handlers are restored after."""
    stop = {"signal": None, "here": False}     # here: this process got one (agree_to_stop may set signal)

    def on_signal(signum, frame):
        if stop["here"]:                    # a second Ctrl-C: give up at once, without saving
            raise KeyboardInterrupt
        stop["signal"], stop["here"] = signal.Signals(signum).name, True
        print(f"\n{stop['signal']}: finishing this step and saving a checkpoint (again to quit without saving)",
              file=sys.stderr)
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def agree_to_stop(stop, device):
    """Under DDP every rank must stop at the same step: true if any rank has seen a signal."""
    if not torch.distributed.is_initialized():    # one process: no round trip to the device, which
        return stop["signal"] is not None          # would make the host wait for every step
    flag = all_reduce(torch.tensor([stop["signal"] is not None], device=device, dtype=torch.int), "max")
    if flag.item() and stop["signal"] is None:
        stop["signal"] = "a signal on another rank"
    return stop["signal"] is not None


class NonFiniteGuard:
    """Remembers the first step at which a loss term was not finite, without a host-device sync
    per step; check() (at log steps and before every checkpoint, all ranks agreeing) stops the
    run before a checkpoint with broken weights can replace a good one."""
    NEVER = 2 ** 62

    def __init__(self, names, device):
        self.names = names
        self.first_bad = torch.full((len(names),), self.NEVER, device=device)

    def update(self, values, step):
        bad = ~torch.isfinite(torch.stack([v.detach().float() for v in values]))
        self.first_bad = torch.where(bad, torch.clamp(self.first_bad, max=step), self.first_bad)

    def check(self):
        steps = all_reduce(self.first_bad, "min").tolist()
        if min(steps) < self.NEVER:
            bad = [f"{name} (step {s})" for name, s in zip(self.names, steps) if s < self.NEVER]
            raise UserError(f"the loss became non-finite: {', '.join(bad)}; stopping without saving "
                            f"(the checkpoints on disk are from before)")
