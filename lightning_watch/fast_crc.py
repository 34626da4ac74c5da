"""TensorBoard's event checksums at C speed, when a CRC32C package is installed.

Without TensorFlow, TensorBoard checksums every event record it writes with a pure-Python CRC32C
(about 1 µs per byte on a laptop core). A logging step of per-layer statistics is a few kilobytes
of scalars, so its checksum costs milliseconds in TensorBoard's writer thread, which holds the
GIL while it runs: the training steps that follow pay for it. With ``crc32c`` or
``google-crc32c`` installed (``pip install "lightning-watch[fast]"``), :func:`install` makes
TensorBoard's record writer use that package's C implementation: the same checksum, the same
bytes, checked against TensorBoard's own function before it is used.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

_MASK_DELTA = 0xA282EAD8
_state: dict[str, bool] = {}


def _c_crc32c() -> Callable[[bytes], int] | None:
    try:
        import crc32c

        return crc32c.crc32c
    except ImportError:
        pass
    try:
        import google_crc32c

        return lambda data: google_crc32c.value(bytes(data))
    except ImportError:
        return None


def masked(crc: Callable[[bytes], int]) -> Callable[[bytes], int]:
    """TFRecord's masked CRC (a rotation plus a constant) over a plain CRC32C function."""

    def masked_crc32c(data: bytes) -> int:
        x = crc(data)
        return (((x >> 15) | (x << 17)) + _MASK_DELTA) & 0xFFFFFFFF

    return masked_crc32c


def install() -> bool:
    """Use a C CRC32C in TensorBoard's record writer, once per process; returns whether it is in use.

    Does nothing (returns ``False``) without a CRC32C package, or if its checksum differs from
    TensorBoard's on a test record.

    Example:
        >>> isinstance(install(), bool)
        True
    """
    if "installed" in _state:
        return _state["installed"]
    _state["installed"] = False
    crc = _c_crc32c()
    if crc is None:
        return False
    try:
        from tensorboard.compat.tensorflow_stub import pywrap_tensorflow
        from tensorboard.summary.writer import record_writer
    except ImportError:  # pragma: no cover - a TensorBoard without the stub writer
        return False
    fast = masked(crc)
    probe = bytes(range(256)) * 3 + b"lightning_watch"
    if record_writer.masked_crc32c is not pywrap_tensorflow.masked_crc32c:
        return False  # someone else replaced it already: leave theirs
    if fast(probe) != pywrap_tensorflow.masked_crc32c(probe) or fast(b"") != pywrap_tensorflow.masked_crc32c(b""):
        log.debug("lightning_watch: the installed CRC32C package disagrees with TensorBoard's; not used")
        return False
    record_writer.masked_crc32c = fast
    _state["installed"] = True
    return True
