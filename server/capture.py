"""Opt-in capture of served traffic as training data (``loraplex serve --capture-dir DIR``).

Each successful generation appends one line to ``DIR/<model>.jsonl`` in ``loraplex train``'s
format: ``{"prompt", "completion"}`` for text completions, ``{"messages": [..., assistant]}`` for
chat. Prompts given as token ids are not captured. The files hold users' prompts and the model's
answers verbatim: treat them as sensitive data (access control, retention, consent).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class CaptureWriter:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def path_for(self, model: str) -> Path:
        name = _UNSAFE.sub("_", model).strip("._") or "model"
        return self.directory / f"{name}.jsonl"

    def record(self, model: str, source: dict, completion: str) -> None:
        """``source`` is ``{"prompt": str}`` or ``{"messages": [...]}`` as the client sent it."""
        if "messages" in source:
            entry = {"messages": [*source["messages"], {"role": "assistant", "content": completion}]}
        else:
            entry = {"prompt": source["prompt"], "completion": completion}
        line = json.dumps(entry, ensure_ascii=False) + "\n"
        with self.path_for(model).open("a", encoding="utf-8") as f:
            f.write(line)  # one write per line: concurrent appends do not interleave
