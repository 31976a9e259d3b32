"""Small shared pieces at the bottom of the import graph: one-line errors, flag types,
devices, the git commit, bf16 autocast and the few lines of multi-GPU set-up."""
import argparse
import contextlib
import math
import os
import platform
import subprocess
import sys

import torch
import torch.distributed as dist


class UserError(Exception):
    """A problem the user can fix (a flag, a file, the data); printed as one line, exit status 2."""


def first_line(error, limit=200):
    """The first non-empty line of an exception's text, for a one-line message: a library's
    text can run over many lines, or be empty."""
    lines = [l.strip() for l in str(error).splitlines() if l.strip()]
    return lines[0][:limit] if lines else ""


def run_main(main):
    """Call main(); turn a UserError into one line on stderr and exit status 2, and running out
    of memory into one line and exit status 1."""
    try:
        main()
    except UserError as e:
        # one write, line and newline together: the processes of a torchrun share one stderr, and
        # print's two writes (the text, then the newline) let their lines run into each other
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except RuntimeError as e:
        # CUDA's allocator raises torch.OutOfMemoryError, the CPU's and MPS's a plain RuntimeError;
        # their text runs over several lines of numbers, and its first says how much was asked for
        text = first_line(e)
        if not (isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in text or "out of memory" in text):
            raise
        sys.stderr.write(f"error: out of memory ({text}); try a smaller --batch-size\n")
        sys.exit(1)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the docstring's layout and shows every flag's default (unless the help text
    already says it, or there is none to show; a default of 0 is shown, though 0 == False)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def number(kind=float, min=None, max=None, above=None, below=None):
    """An argparse type: a finite int or float within the given bounds (min / max inclusive,
    above / below exclusive). A value outside them is a one-line usage error, exit status 2."""
    bounds = [f">= {min}" if min is not None else "", f"> {above}" if above is not None else "",
              f"<= {max}" if max is not None else "", f"< {below}" if below is not None else ""]
    want = f"{'an integer' if kind is int else 'a finite number'} {' and '.join(b for b in bounds if b)}".strip()

    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}") from None
        ok = (math.isfinite(v) and (min is None or v >= min) and (max is None or v <= max)
              and (above is None or v > above) and (below is None or v < below))
        if not ok:
            raise argparse.ArgumentTypeError(f"must be {want}, got {text}")
        return v
    return parse


def writable_dir(path, flag="--out", given=None):
    """Check, creating nothing, that directory `path` exists or can be made, and can be written
    (`given`: the flag's value, when path is the directory of a file). An empty path (an unset
    shell variable, say) is refused: it would be the current directory."""
    if not path:
        raise UserError(f"{flag} {path!r}: give a directory (an empty path would write into the current one)")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):                 # the nearest part of the path that exists
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {flag} {given or repr(path)}: {existing!r} is not a writable directory")


def output_file(path, flag="--out", suffixes=None):
    """Check an output file's name before the work that produces it (minutes of sampling must not
    end in a traceback about the name): its suffix, and that its directory can be written."""
    if suffixes and not path.endswith(tuple(suffixes)):
        raise UserError(f"{flag} {path!r}: the file name must end in {' or '.join(suffixes)}")
    if os.path.isdir(path):
        raise UserError(f"{flag} {path!r} is a directory; give a file name")
    writable_dir(os.path.dirname(os.path.abspath(path)), flag, given=repr(path))
    return path


@contextlib.contextmanager
def atomic_output(path, what=None, after="", mode="wb"):
    """A file object for path's new contents, written to path.tmp<pid> beside it and renamed over
    path only once complete and on disk: a full disk or a kill never leaves a torn file, nor
    destroys the one there before. On failure, one line: could not write <what> (<error>)<after>."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if hasattr(os, "O_DIRECTORY"):          # make the rename itself durable (POSIX)
            dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, (OSError, RuntimeError)):     # RuntimeError: torch.save's writer, on a full disk
            raise UserError(f"could not write {what or repr(path)} ({e}){after}") from None
        raise


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
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"unknown --device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        # else the first tensor moved there fails deep inside PyTorch ("invalid device ordinal")
        n = torch.cuda.device_count()
        raise UserError(f"--device {name}: this machine has {n} CUDA GPU{'s' if n > 1 else ''}, "
                        f"cuda:0{f' to cuda:{n - 1}' if n > 1 else ''}")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was asked for but MPS is not available; use --device cpu")
    return dev


def describe_device(device):
    """The device in words, for logs and benchmark tables: the GPU's name, or the CPU and its threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def git_commit(path=None):
    """The git commit of the code in `path` (this file's directory), '+dirty' when tracked files
    differ from it; None outside a git checkout or without git. The config line of a run records
    it, so that its numbers can be traced to the code that made them."""
    git = lambda *a: subprocess.run(["git", "-C", path or os.path.dirname(os.path.abspath(__file__)), *a],
                                    capture_output=True, text=True, timeout=30)
    try:
        head = git("rev-parse", "--short=12", "HEAD")
        if head.returncode:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def autocast(device):
    """bf16 autocast on CUDA; a no-op elsewhere (CPU bf16 is slow, MPS support is partial)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------
# Several processes (torchrun): DDP over NCCL on GPUs, gloo on the CPU
# ----------------------------------------------------------------------------------------

def init_distributed(device_flag="auto"):
    """(rank, world size, device). One process unless launched by torchrun, which sets RANK and
    WORLD_SIZE; each process then takes the GPU of its LOCAL_RANK."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, pick_device(device_flag)
    if ":" in device_flag:
        raise UserError(f"--device {device_flag}: under torchrun each process takes the GPU of its LOCAL_RANK")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() and device_flag in ("auto", "cuda")
    device = torch.device(f"cuda:{local_rank}") if use_cuda else pick_device(device_flag)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def all_reduce(t, op="mean"):
    """In place over all processes ('mean', 'sum', 'min' or 'max'); a no-op in a single process."""
    if dist.is_initialized():
        dist.all_reduce(t, op={"mean": dist.ReduceOp.SUM, "sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN,
                               "max": dist.ReduceOp.MAX}[op])
        if op == "mean":
            t /= dist.get_world_size()
    return t


def mean_over_gpus(values):
    """{name: tensor (a scalar or a vector)} -> {name: float or list of floats}, averaged over all
    processes in one all_reduce (and one host-device sync)."""
    flat = all_reduce(torch.cat([v.detach().float().reshape(-1) for v in values.values()])).tolist()
    out, i = {}, 0
    for name, v in values.items():
        out[name] = flat[i] if v.dim() == 0 else flat[i:i + v.numel()]
        i += v.numel()
    return out


@contextlib.contextmanager
def rank0_first(device):
    """The block runs on rank 0 first (a download, the run directory, a checkpoint: work that
    rank 0 alone does, or does before the others), then on the other ranks. If it fails on any
    rank, every rank stops, each with one line, instead of going on to its next collective with a
    process that has left (gloo's "Connection closed by peer" traceback; NCCL's wait until its
    timeout where no torchrun agent on the node stops the others). Tested with gloo only."""
    if not dist.is_initialized():
        yield
        return
    rank, flag = dist.get_rank(), torch.zeros(1, device=device)
    # 1. rank 0 runs the block, and tells the others whether it failed (1) or not (0)
    if rank == 0:
        try:
            yield
        except BaseException:
            dist.broadcast(flag.fill_(1), src=0)
            flag.item()         # wait until it is sent: NCCL only queues it, and this process is leaving
            raise
    dist.broadcast(flag, src=0)
    if flag.item():
        raise UserError("stopping: rank 0 failed (its error is above)")
    # 2. then the others run it, and all learn the highest rank that failed (as rank + 1; 0: none)
    if rank != 0:
        try:
            yield
        except BaseException:
            dist.all_reduce(flag.fill_(rank + 1), op=dist.ReduceOp.MAX)
            flag.item()
            raise
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        raise UserError(f"stopping: rank {int(flag.item()) - 1} failed (its error is above)")
