"""How a run ends when something fails: which rank prints what, with which exit code, and when the ranks agree.

The promise (README, docs/checkpoints.md): the first line about a failure starts with `error:` and names the
cause, whichever rank it happened on, and every rank that knows the cause exits with the same code.

* Failures every rank meets alike (a bad config value, a checkpoint that does not fit, a non-finite loss) are
  printed once, by rank 0.
* Start-up runs in steps that end with `agree`: each rank's outcome (None or its failure) is gathered on every
  rank, so a failure on rank 1 alone (its RNG file is corrupt, say) stops every rank at the same point with rank
  1's message, instead of rank 1 exiting silently and rank 0 dying later on a closed connection. Nothing in the
  run directory changes before the last agreement (see `muon_recipes.train.entry`).
* A failure on one rank in the middle of training, where the others are waiting in a collective, is printed by
  that rank itself, at once, before it exits; the others then fail on the broken connection, later.

Under torchrun each failing rank also writes its line to torchrun's error file (`TORCHELASTIC_ERROR_FILE`), so the
failure summary torchrun prints after the run names the cause too instead of pointing to its documentation.
torchrun's own exit code stays 1 (it reports every failed worker that way); the ranks' codes are in its summary.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Optional, TypeVar

from muon_recipes.config import first_line

EXIT_FAULT = 1  # an unexpected exception (a bug, a lost rank): its traceback follows the line
EXIT_BAD_INPUT = 2  # config, data, run directory (a full disk included), checkpoint, a resource a value asks for
EXIT_NONFINITE = 3  # train.nonfinite=abort, or a non-finite state that must not be saved

T = TypeVar("T")

# How torch words an allocation that failed (CUDA's OutOfMemoryError, the CPU allocator's RuntimeError).
_OUT_OF_MEMORY = ("CUDA out of memory", "can't allocate memory", "out of memory")
# How gloo and NCCL word the failure of a collective whose peer process has gone away.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted",
              "remote process exited")


@dataclass
class Failure:
    rank: int
    code: int
    message: str  # one line
    details: str = ""  # a traceback, for unexpected exceptions only


class RunFailed(Exception):
    """Raised on every rank once the ranks agree that at least one of them failed."""

    def __init__(self, failures: list[Failure]):
        self.failures = failures
        super().__init__(failures[0].message)


def describe(e: BaseException, rank: int) -> Failure:
    """The failure an exception means: its exit code and one line (the known kinds say their own)."""
    from muon_recipes.config import ConfigError
    from muon_recipes.train.checkpoint import CheckpointError
    from muon_recipes.train.trainer import NonFiniteError

    if isinstance(e, RunFailed):
        return e.failures[0]
    if isinstance(e, (ConfigError, CheckpointError)):
        return Failure(rank, EXIT_BAD_INPUT, first_line(e))
    if isinstance(e, NonFiniteError):
        return Failure(rank, EXIT_NONFINITE, first_line(e))
    text = first_line(e)
    if isinstance(e, OSError):  # the file system's answer names the path and the reason: no traceback needed
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        return Failure(rank, EXIT_BAD_INPUT if full else EXIT_FAULT, f"{type(e).__name__}: {text}")
    if isinstance(e, MemoryError) or any(sign in text for sign in _OUT_OF_MEMORY):
        return Failure(rank, EXIT_BAD_INPUT, f"{type(e).__name__}: {text[:300]}; the run needs more memory than "
                                             "this process has: lower train.batch_size or train.seq_len (raise "
                                             "train.grad_accum to keep the batch), or shard over more processes")
    if any(sign in text for sign in _PEER_GONE):  # the consequence of another rank's failure, not a cause
        return Failure(rank, EXIT_FAULT, f"lost the connection to another rank, which stopped first (its error, if "
                                         f"it could say one, is above): {type(e).__name__}: {text}")
    return Failure(rank, EXIT_FAULT, f"{type(e).__name__}: {text}" if text else type(e).__name__,
                   "".join(traceback.format_exception(type(e), e, e.__traceback__)))


def _gather(failure: Optional[Failure]) -> list[Optional[Failure]]:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [failure]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, failure)
    return gathered


def agree(step: Callable[[], T], rank: int) -> T:
    """Run this rank's part of a start-up step; raise RunFailed on every rank if any rank's part failed.

    Every rank must call it at the same point (it is a collective), and `step` must not end in the middle of a
    collective on some ranks only: a step is a stretch of local work, or collectives that fail alike everywhere.
    """
    try:
        value, failure = step(), None
    except Exception as e:  # noqa: BLE001 - every rank's failure is reported, whatever its kind
        value, failure = None, describe(e, rank)
    failures = [f for f in _gather(failure) if f is not None]
    if failures:
        raise RunFailed(failures)
    return value


def format_lines(failures: list[Failure]) -> list[str]:
    """`error: ...` lines: one if every failing rank says the same, else one per rank that failed."""
    messages = {f.message for f in failures}
    if len(messages) == 1 and (len(failures) > 1 or failures[0].rank == 0):
        return [f"error: {failures[0].message}"]
    return [f"error: rank {f.rank}: {f.message}" for f in failures]


def write_error_file(line: str) -> None:
    """torchrun's error file for this worker, if it gave one: its failure summary then shows `line`."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w") as f:  # the layout torchrun's own ErrorHandler.record_exception writes
            json.dump({"message": {"message": line, "extraInfo": {"py_callstack": line,
                                                                  "timestamp": str(int(time.time()))}}}, f)
    except OSError:
        pass  # the line is on stderr already


def ignore_sigterm_while_exiting() -> None:
    """torchrun sends SIGTERM to every worker once one has exited; a rank that knows why the run stops and is about
    to exit with that code must not die by the signal instead (its code is what torchrun's summary shows). The
    signal is ignored rather than handled: a Python handler does not run while the rank is inside a collective
    or shutting the interpreter down. torchrun's SIGKILL, after its grace period, still ends a rank that hangs."""
    if os.environ.get("TORCHELASTIC_RUN_ID"):  # only under torchrun: an in-process caller keeps its own handler
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def print_failures(failures: list[Failure]) -> None:
    lines = format_lines(failures)
    print("\n".join(lines), file=sys.stderr, flush=True)
    for f in failures:
        if f.details:
            print(f"rank {f.rank}: {f.details.rstrip()}", file=sys.stderr, flush=True)


# How long a rank waits before it exits with an error found before the process group exists. torchrun stops every
# worker as soon as one exits non-zero. Rank 0, the one that prints, may start later (Hydra writes its output
# directory first): without the wait a quicker rank 1 could have it stopped before its line is out. And a rank
# still starting up (importing torch on a loaded machine) when a quicker one exits would die by the SIGTERM
# instead of exiting with the code: so rank 0 waits too, after its line, in a world of several ranks.
PEER_EXIT_GRACE_S = 5.0


def exit_before_start(message: str, code: int = EXIT_BAD_INPUT) -> None:
    """One line on stderr (rank 0 only, so torchrun's output is not N copies), exit `code` on every rank: for
    failures every rank finds alike before the process group exists (no collective to agree through)."""
    ignore_sigterm_while_exiting()
    write_error_file(f"error: {message}")
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        time.sleep(PEER_EXIT_GRACE_S)
    sys.exit(code)


def exit_agreed(failure: RunFailed, rank: int) -> None:
    """End this rank after an agreed failure: rank 0 prints, the others wait until it has (torchrun stops every
    worker as soon as one exits non-zero), every rank exits with the first failure's code."""
    import torch.distributed as dist

    lines = format_lines(failure.failures)
    ignore_sigterm_while_exiting()
    if rank == 0:
        print_failures(failure.failures)
    write_error_file(lines[0])
    if dist.is_initialized() and dist.get_world_size() > 1:
        try:
            dist.barrier()
        except Exception:  # noqa: BLE001 - a rank that is gone cannot be waited for
            pass
    sys.exit(failure.failures[0].code)


def exit_alone(e: BaseException, rank: int) -> None:
    """End this rank after a failure the others may not share (mid-training): print it here, at once."""
    failure = describe(e, rank)
    ignore_sigterm_while_exiting()
    print_failures([failure])
    write_error_file(format_lines([failure])[0])
    sys.exit(failure.code)
