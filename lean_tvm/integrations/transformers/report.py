"""Who served each attention call, and one log line per reason for falling back to SDPA.

``counts`` maps "lean_tvm" and "sdpa" to the eager attention calls each served (one per layer per
forward). Nothing is counted or logged while ``torch.compile`` traces: a count read there would be
a guard that recompiles every step, and a logging call breaks the graph. A compiled step's graph
holds the ``lean_tvm::`` op that serves it instead; its prefill, run eagerly, logs the reasons.
"""

from __future__ import annotations

import logging

import torch

LOG = logging.getLogger("lean_tvm.integrations.transformers")
LEAN, SDPA = "lean_tvm", "sdpa"
PREFILL = "prefill"  # how a forward of many new tokens, or of a prompt, is named: SDPA serves it by design
counts: dict[str, int] = {}
_logged: set[str] = set()


def served_by_lean() -> None:
    if not torch.compiler.is_compiling():
        counts[LEAN] = counts.get(LEAN, 0) + 1


def served_by_sdpa(reason: str | None) -> None:
    """One call SDPA served; ``reason`` (if the caller knows it) is logged once."""
    if not torch.compiler.is_compiling():
        counts[SDPA] = counts.get(SDPA, 0) + 1
        if reason is not None:
            say_once(reason)


def say_once(reason: str) -> None:
    """Log ``reason`` for falling back to SDPA, the first time it is seen outside a compiled region:
    at INFO for prefill (the design), at WARNING for what the kernel cannot serve."""
    if reason not in _logged and not torch.compiler.is_compiling():
        _logged.add(reason)
        LOG.log(logging.INFO if reason.startswith(PREFILL) else logging.WARNING,
                "lean_tvm falls back to SDPA: %s", reason)


def reset() -> None:
    """Forget the counts and which reasons were logged (tests, benchmarks)."""
    counts.clear()
    _logged.clear()
