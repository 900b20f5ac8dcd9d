"""Small helpers shared by the Python rooms: argument checks, torch -> numpy, atomic writes.

Nothing here imports torch (a torch tensor is recognised by its module name), so the numpy-only
modules (traces, expert_map, cli) stay importable without it.
"""

from __future__ import annotations

import contextlib
import numbers
import os
import secrets

import numpy as np

__all__ = ["atomic_write", "check_int", "is_torch", "to_numpy"]


def is_torch(x) -> bool:
    """True for a torch tensor (or any torch object), without importing torch."""
    return type(x).__module__.startswith("torch")


def check_int(value, name: str, minimum: int | None = None) -> int:
    """``value`` as a Python int. Accepts Python and numpy integers, rejects bool and anything
    else; ValueError naming ``name`` when it is not an int or is below ``minimum``."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"{name} must be an int{bound}, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def to_numpy(x, name: str) -> np.ndarray:
    """``x`` (torch tensor, numpy array or nested sequence) -> numpy array.

    A tensor is detached and copied to the CPU; bfloat16 / float16 (no numpy bfloat16) are
    upcast to float32 so every float array the rooms see is float32 or float64. The result may
    share memory with ``x`` (a CPU tensor or an ndarray); callers that keep or modify it copy.
    ValueError naming ``name`` for a ragged nested sequence.
    """
    if is_torch(x):
        x = x.detach()
        if str(x.dtype) in ("torch.bfloat16", "torch.float16"):
            x = x.float()
        return x.cpu().numpy()
    try:
        return np.asarray(x)
    except (ValueError, TypeError) as e:  # ragged nested lists
        raise ValueError(f"{name} is not a rectangular numeric array ({e})") from None


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs):
    """Context manager yielding a file object whose content replaces ``path`` atomically when the
    block ends without an exception (a temporary file in the same directory, then
    ``os.replace``). On any failure the temporary file is removed and ``path`` is untouched."""
    target = os.fspath(path)
    folder, base = os.path.split(target)
    # pid + random suffix: unique across processes and threads; "x" never clobbers a stranger
    tmp = os.path.join(folder, f".{base}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, mode.replace("w", "x"), **open_kwargs) as f:
            yield f
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
