"""Progress lines of long work, on stderr (so that ``--json`` keeps stdout for its one JSON object)."""

from __future__ import annotations

import contextvars
import sys

LOG_PREFIX: contextvars.ContextVar[str] = contextvars.ContextVar("raydistill_log_prefix", default="")
"""Put before every ``log`` line of the current thread (the demo's arms run side by side: ``[baseline] ``)."""


def log(message: str) -> None:
    """Write ``[raydistill] <prefix><message>`` to stderr.

    Written to the stream rather than printed: in a Ray Train worker ``print`` is patched to tee the line *and*
    hand it to Train's logger, so every printed progress line reached the driver twice.
    """
    sys.stderr.write(f"[raydistill] {LOG_PREFIX.get()}{message}\n")
    sys.stderr.flush()
