"""Opt-in capture of served traffic as training data (``loraplex serve --capture-dir DIR``).

Each successful generation appends one line to ``DIR/<model>.jsonl`` in ``loraplex train``'s
format: ``{"prompt", "completion"}`` for text completions, ``{"messages": [..., assistant]}`` for
chat. Prompts given as token ids are not captured. The files hold users' prompts and the model's
answers verbatim: treat them as sensitive data (access control, retention, consent).

One file per model name, never shared: the name is percent-encoded (injective, so ``x``, ``x.``
and ``x_`` get three files), and files are opened relative to the directory opened once at
start, without following symlinks (a link planted in the directory is refused, not written through).
"""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

logger = logging.getLogger(__name__)

_KEPT = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")


def capture_file_name(model: str) -> str:
    """``<model>.jsonl`` with every other character (and a leading '.') percent-encoded as UTF-8."""
    encoded = "".join(c if c in _KEPT else "".join(f"%{b:02X}" for b in c.encode("utf-8", "surrogatepass"))
                      for c in model)
    if encoded.startswith("."):
        encoded = "%2E" + encoded[1:]
    return f"{encoded}.jsonl"


class CaptureWriter:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)

    def path_for(self, model: str) -> Path:
        return self.directory / capture_file_name(model)

    def record_all(self, model: str, source: dict, completions: list[str]) -> None:
        """One line per completion (the choices of one prompt)."""
        for completion in completions:
            self.record(model, source, completion)

    def record(self, model: str, source: dict, completion: str) -> None:
        """``source`` is ``{"prompt": str}`` or ``{"messages": [...]}`` as the client sent it."""
        if "messages" in source:
            entry = {"messages": [*source["messages"], {"role": "assistant", "content": completion}]}
        else:
            entry = {"prompt": source["prompt"], "completion": completion}
        line = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8", "backslashreplace")
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
        try:
            fd = os.open(capture_file_name(model), flags, 0o600, dir_fd=self._dir_fd)
        except OSError as exc:  # a symlink (ELOOP), a FIFO without reader, ...: never written through
            logger.error("capture for %r skipped: %s", model, exc)
            return
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                logger.error("capture for %r skipped: not a regular file", model)
                return
            os.write(fd, line)  # one write per line: concurrent appends do not interleave
        finally:
            os.close(fd)
