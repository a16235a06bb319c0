"""Run logs under logs/, with every configured secret masked."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable

LOG_DIR_ENV = "FEDKEEPER_LOG_DIR"


def log_dir() -> Path:
    d = Path(os.environ.get(LOG_DIR_ENV, "logs"))
    d.mkdir(parents=True, exist_ok=True)
    return d


class RedactingFilter(logging.Filter):
    """Replaces secret values in the final message text (args included)."""

    def __init__(self, secrets: Iterable[str]):
        super().__init__()
        # Longest first so that "uuid:key" is masked before "key" alone.
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for s in self.secrets:
            if s in text:
                text = text.replace(s, "***")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            msg = record.getMessage()
            red = self.redact(msg)
            if red != msg:
                record.msg, record.args = red, None
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = self.redact(record.exc_text)
        return True


def setup_run_log(name: str, secrets: Iterable[str], level: int = logging.INFO) -> Path:
    """Send the `fedkeeper` logger to logs/<name>.log; returns the path."""
    if not name or name in (".", "..") or Path(name).name != name:
        # A path would write outside the log directory or into a missing one.
        raise ValueError(f"run log name {name!r} is not a file name")
    path = log_dir() / f"{name}.log"
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter(secrets))
    logger = logging.getLogger("fedkeeper")
    for h in list(logger.handlers):
        if isinstance(h, logging.FileHandler):
            logger.removeHandler(h)
            h.close()
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return path
