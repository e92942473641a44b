"""Console logging and tqdm progress bars (TensorBoard goes through ``accelerate``'s trackers)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _DropEmptyFp32Warning(logging.Filter):
    """diffusers' ModelMixin.to(dtype) warns "modules ... should be kept in float32: []" even when the list is
    empty (nothing is kept in float32, nothing can go wrong); drop exactly that case, keep a non-empty list."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


# Installed on import: every entry point imports this module, and a filter on diffusers' logger works even
# before diffusers itself is imported (logging.getLogger creates the logger).
_EMPTY_FP32_FILTER = _DropEmptyFp32Warning()
logging.getLogger("diffusers.models.modeling_utils").addFilter(_EMPTY_FP32_FILTER)


def get_logger(name: str, level: int = logging.INFO) -> logging.Logger:
    """A logger that prints to stderr once (no duplicate handlers on repeated calls)."""
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level)
    return logger


def progress(
    iterable: Iterable[Any] | None = None,
    total: int | None = None,
    desc: str = "",
    disable: bool = False,
    unit: str = "it",
    **kwargs: Any,
) -> tqdm:
    """A tqdm bar with the repo's defaults (rate shown in ``unit``/s, smooth rate estimate)."""
    return tqdm(iterable, total=total, desc=desc, disable=disable, unit=unit, dynamic_ncols=True, **kwargs)


def get_main_process_logger(name: str, level: int = logging.INFO):
    """``accelerate.logging.get_logger`` over the repo's handler: messages from the main process only
    (``main_process_only=False`` per call for all ranks). Use it only once an ``Accelerator`` exists."""
    from accelerate.logging import get_logger as accelerate_get_logger

    get_logger(name, level)  # the stderr handler and format
    return accelerate_get_logger(name, log_level=logging.getLevelName(level))
