"""Running llama.cpp's tools: output streamed to the task log, results staged and renamed into place.

Every output is written to a scratch name in the target directory (``.<name>.part-<token>``, see
:mod:`include.store.scratch`) and renamed into place only after it was validated, so nothing half-written is ever
seen under the final name. A tool killed half way leaves a scratch whose lock is free: the next output staged in
that directory removes it (and in the artifact store, the whole build directory goes with the next build). A tool the
kernel's OOM killer ended raises :class:`~include.errors.OutOfMemoryError` (not retried; see
:mod:`include.resources.oom`); any other signal is returned to the caller as a negative exit code.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import subprocess
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from include.errors import GGUFError
from include.gguf.reader import GGUFSummary, inspect_split
from include.gguf.tool_log import classify
from include.resources.oom import raise_if_oom_killed, read_oom_counters
from include.store import scratch

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
LOG_EVERY_S = 3.0  # progress lines are logged at INFO at most this often (all lines go to DEBUG)
TAIL_LINES = 25


@contextmanager
def atomic_target(dst: Path) -> Iterator[Path]:
    """Yield a scratch path next to ``dst``; rename it onto ``dst`` on success, delete it on failure."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    scratch.sweep(dst.parent, kinds=("part",))
    tmp = scratch.claim(dst, "part", directory=False)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        scratch.finish(tmp, dst)
    finally:
        scratch.discard(tmp)


@contextmanager
def staged_outputs(dst: Path) -> Iterator[Path]:
    """Yield ``<scratch dir>/<dst name>`` for a tool that writes one file or split shards next to it.

    On success every ``.gguf`` in the temp dir is validated by the caller and then moved next to ``dst``
    (the first shard last-but-not-least: all shards are in place before the caller reports them).
    The temp dir is removed in every case, so nothing half-written stays behind.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    scratch.sweep(dst.parent, kinds=("part",))
    work = scratch.claim(dst, "part")
    try:
        yield work / dst.name
        for produced in sorted(work.glob("*.gguf")):
            os.chmod(produced, 0o644)
            os.replace(produced, dst.parent / produced.name)
    finally:
        scratch.discard(work)


def first_output(dst: Path) -> Path:
    """``dst`` itself, or the first shard ``<stem>-00001-of-N.gguf`` a split run wrote instead."""
    if dst.is_file():
        return dst
    shards = sorted(dst.parent.glob(f"{glob.escape(dst.stem)}-00001-of-*.gguf"))
    if not shards:
        raise GGUFError(f"the tool reported success but wrote no {dst.name} (nor shards of it)",
                        fix="read the tool output in the task log; check free disk space")
    return shards[0]


def run_tool(cmd: Sequence[str], *, what: str, env: dict[str, str] | None = None,
             cwd: str | Path | None = None) -> tuple[int, list[str]]:
    """Run an external llama.cpp tool with its output streamed to the task log; (returncode, last lines)."""
    return run_streaming(cmd, env=env if env is not None else dict(os.environ), what=what, cwd=cwd)


def run_streaming(cmd: Sequence[str], *, env: dict[str, str], what: str,
                   cwd: str | Path | None = None) -> tuple[int, list[str]]:
    """Run ``cmd``, logging its output lines, and return (returncode, last lines).

    Each line is logged at its own level (:mod:`include.gguf.tool_log`): warnings and errors always, notices and
    progress (tqdm bars rewritten as ``desc: done of total (pct%)``) at INFO at most every ``LOG_EVERY_S``, the rest
    at DEBUG.

    OutOfMemoryError when the tool died of SIGKILL while the kernel's OOM-kill counter rose.
    """
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    last_info = 0.0
    log.info("%s: %s", what, " ".join(cmd))
    counters = read_oom_counters()
    started = time.monotonic()
    # Same process group as the caller: whoever kills the task (Airflow timeout, Ctrl-C) kills the tool too.
    with subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace", bufsize=1) as proc:
        try:
            for raw in proc.stdout or ():
                line = raw.rstrip()
                if not line:
                    continue
                tail.append(line)
                now = time.monotonic()
                seen = classify(line)
                if seen.level >= logging.WARNING:  # never rate-limited
                    log.log(seen.level, "%s [%.0fs] %s", what, now - started, seen.text)
                elif seen.level == logging.INFO and now - last_info >= LOG_EVERY_S:
                    log.info("%s [%.0fs] %s", what, now - started, seen.text)
                    last_info = now
                else:
                    log.debug("%s %s", what, seen.text)
        except BaseException:
            proc.kill()  # the caller is going away (timeout, interrupt): do not leave the tool running
            raise
        returncode = proc.wait()
    log.info("%s: exit code %d after %.1fs", what, returncode, time.monotonic() - started)
    raise_if_oom_killed(returncode, counters, what)
    return returncode, list(tail)


def final_summary(path: Path, staged: GGUFSummary) -> GGUFSummary:
    """The summary of a renamed output, with the sha256 computed when it was staged."""
    # The staged file was hashed when it was validated; a rename does not change bytes, so it is not read again.
    final = dataclasses.replace(inspect_split(path, with_sha256=False), sha256=staged.sha256)
    log.info("wrote %s: %d bytes, %d tensors, %.2f bits/weight, types %s", path, final.bytes, final.tensor_count,
             final.bits_per_weight, final.fractions())
    if final.tensor_count != staged.tensor_count:  # pragma: no cover - renaming cannot change the content
        raise GGUFError(f"{str(path)!r} changed while being renamed", fix="retry the task")
    return final
