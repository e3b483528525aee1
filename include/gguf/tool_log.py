"""What a llama.cpp tool's output line means for the task log: its severity, and progress bars as plain progress.

The converter logs through Python's ``logging`` (``INFO:hf-to-gguf:...``, ``WARNING:hf-to-gguf:...``) and draws
tqdm bars (``Writing:  47%|████▋     | 7.09G/15.2G [00:45<00:39, 207Mbyte/s]``); ``llama-quantize`` and
``llama-imatrix`` print llama.cpp's own lines, where trouble says ``error`` or ``failed``. Each line gets the level
it really has, so a healthy run logs nothing at ERROR and a real error is never buried among notices. Lines that
llama.cpp prints as warnings but that are expected in our use are notices (INFO).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

_PREFIX = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL):")
_ERROR = re.compile(r"(^Traceback|\b(error|failed|failure|exception|abort(ed)?)\b)", re.IGNORECASE)
_WARNING = re.compile(r"\bwarn(ing)?\b", re.IGNORECASE)
_BAR = re.compile(r"^(?P<desc>[^|]*?):?\s*(?P<pct>\d{1,3})%\|[^|]*\|\s*(?P<done>[\d.]+\s*\w*)/(?P<total>[\d.]+\s*\w*)"
                  r"(?:\s*\[[^,\]]*(?:<[^,\]]*)?(?:,\s*(?P<rate>[^\]]+))?\])?")
EXPECTED = (
    "Unknown RoPE type: default",  # the converter's notice for models without rope scaling: nothing is wrong
    "possible training context overflow",  # a vocabulary-only load has no training context (n_ctx_train 0)
)


@dataclass(frozen=True)
class ToolLine:
    """One output line: its logging level, its text, and whether it is a progress bar's refresh."""

    level: int
    text: str
    progress: bool = False


def classify(line: str) -> ToolLine:
    """The level and text of one line of tool output (a tqdm bar becomes ``desc: done of total (pct%), rate``)."""
    text = line.strip()
    bar = _BAR.match(text)
    if bar:
        desc = bar["desc"].strip() or "progress"
        rate = f", {bar['rate'].strip()}" if bar["rate"] else ""
        return ToolLine(logging.INFO, f"{desc}: {bar['done'].strip()} of {bar['total'].strip()} ({bar['pct']}%)"
                                      f"{rate}", progress=True)
    if any(expected in text for expected in EXPECTED):
        return ToolLine(logging.INFO, text)
    prefix = _PREFIX.match(text)
    if prefix:
        return ToolLine(logging.getLevelName(prefix[1]), text)
    if _ERROR.search(text):
        return ToolLine(logging.ERROR, text)
    if _WARNING.search(text):
        return ToolLine(logging.WARNING, text)
    return ToolLine(logging.INFO, text)
