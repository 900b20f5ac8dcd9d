"""Small helpers shared by the Python rooms: argument checks, torch -> numpy, atomic writes.

Nothing here imports torch (a torch tensor is recognised by its module name), so the numpy-only
modules (traces, expert_map, cli) stay importable without it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import numbers
import os
import secrets
import stat
import sys
import tempfile

import numpy as np

__all__ = ["atomic_write", "check_bool", "check_int", "check_writable_dir", "is_torch", "to_numpy",
           "standard_stream", "validate_phy2log", "write_target"]


def is_torch(x) -> bool:
    """True for a torch tensor (a subclass too), without importing torch: not for torch's other
    objects (torch.Size, a dtype), which are no array."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def plain_scalar(v):
    """A numpy scalar (np.int64(16), np.bool_(True), np.float32(5.0)) as the Python value it
    stands for; anything else as it is."""
    if type(v).__module__ == "numpy" and hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        if v.dtype.kind in "biuf":
            return v.item()
    return v


def check_int(value, name: str, minimum: int | None = None) -> int:
    """``value`` as a Python int. Accepts Python and numpy integers, rejects bool and anything
    else; ValueError naming ``name`` when it is not an int or is below ``minimum``."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"{name} must be an int{bound}, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_bool(value, name: str) -> bool:
    """A flag: True / False (numpy's too); TypeError naming ``name`` for anything else (a
    config's "false" would read as True)."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def to_numpy(x, name: str) -> np.ndarray:
    """``x`` (torch tensor, numpy array or nested sequence) -> numpy array.

    A tensor is detached and copied to the CPU; bfloat16 / float16 (no numpy bfloat16) are
    upcast to float32 so every float array the rooms see is float32 or float64. The result may
    share memory with ``x`` (a CPU tensor or an ndarray); callers that keep or modify it copy.
    ValueError naming ``name`` for a ragged nested sequence or a meta tensor, TypeError for a
    tensor dtype numpy lacks (float8, quantized).
    """
    if is_torch(x):
        x = x.detach()
        if getattr(x, "is_meta", False):
            raise ValueError(f"{name} is a meta-device tensor (no data); pass real values")
        import torch  # (x is a tensor: torch is loaded already)

        if x.layout != torch.strided:
            raise TypeError(f"{name} must be a dense tensor, got layout {x.layout}; "
                            "call .to_dense() first")
        if x.is_nested:  # (its layout says strided)
            raise TypeError(f"{name} must be a dense tensor, got a nested one")
        if str(x.dtype) in ("torch.bfloat16", "torch.float16"):
            x = x.float()
        try:
            return x.cpu().numpy()
        except TypeError as e:  # a dtype numpy has none of (float8, quantized, ...)
            raise TypeError(f"{name} has dtype {x.dtype}, which has no numpy equivalent; "
                            f"cast it (e.g. .float()) first") from e
    try:
        return np.asarray(x)
    except (ValueError, TypeError) as e:  # ragged nested lists
        raise ValueError(f"{name} is not a rectangular numeric array ({e})") from None


def write_target(path) -> tuple[str, bool, int | None]:
    """Where a write of ``path`` goes: ``(file, in_place, stream)``.

    - The file this process's stdout or stderr writes to (``/dev/stdout``, or any name of the
      file a shell redirected it into, ``> out.txt`` or ``>> run.log``): ``stream`` is that
      descriptor (1 or 2), written through at its position. Replacing that file would take it
      from the stream (the rest of the output lost) or wipe a log appended to.
    - A character device or a pipe (/dev/null, a FIFO): written in place (``in_place``);
      replacing it would put a plain file where the device was, and atomicity means nothing
      there.
    - Anything else: replaced through a temporary file beside what the path names once its
      links are followed (a link's target is rewritten, not the link).

    ValueError for an existing target that is neither a regular file nor one of those (a
    directory, a socket, a block device), a link loop, or a regular file that is read-only (a
    rename would replace it all the same; a plain write would be refused)."""
    target = os.fspath(path)
    if "\0" in target:
        raise ValueError(f"{target!r} holds a NUL byte")
    try:
        st = os.stat(target)  # (follows links)
    except OSError as e:  # missing (a dangling link included), unreachable
        if e.errno == errno.ELOOP:
            raise ValueError(f"{target!r} is a loop of symbolic links") from None
        return os.path.realpath(target), False, None
    for fd in (1, 2):
        try:
            own = os.fstat(fd)
        except OSError:  # (closed)
            continue
        if (own.st_dev, own.st_ino) == (st.st_dev, st.st_ino) and (
                stat.S_ISREG(st.st_mode) or stat.S_ISCHR(st.st_mode)
                or stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode)):
            return target, True, fd
    if stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode):
        return target, True, None
    if stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{target!r} is a directory; name the file to write")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{target!r} is not a regular file (nor a device or pipe written in "
                         f"place); name a file to write")
    real = os.path.realpath(target)
    if not os.access(real, os.W_OK):
        raise ValueError(f"{target!r} is read-only")
    return real, False, None


def standard_stream(path) -> int | None:
    """1 or 2 when writing ``path`` writes this process's stdout or stderr (``write_target``),
    else None."""
    try:
        return write_target(path)[2]
    except ValueError:
        return None


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs):
    """Context manager yielding a file object whose content replaces ``path`` atomically when the
    block ends without an exception (a temporary file in the same directory, then
    ``os.replace``; the old file's permission bits kept). On any failure the temporary file is
    removed and ``path`` is untouched. A link's target is replaced; stdout / stderr, a device or
    a pipe is written in place, as a stream, which nothing makes atomic (a failure midway
    leaves what was written) (``write_target``)."""
    target, in_place, stream = write_target(path)
    if stream is not None:
        # after what Python holds of its own output, through a copy of the descriptor (closing
        # it leaves the stream open; no reopening, which would truncate a redirected file)
        for s in (sys.stdout, sys.stderr):
            if s is not None:
                s.flush()
        fd = os.dup(stream)
        try:
            f = os.fdopen(fd, mode, **open_kwargs)
        except BaseException:
            os.close(fd)  # (a mode or encoding fdopen refuses: the copy is not left open)
            raise
        with f:
            yield f
        return
    if in_place:
        with open(target, mode, **open_kwargs) as f:
            yield f
        return
    folder, base = os.path.split(target)
    try:
        keep = stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        keep = None  # (a new file: the umask's mode, as open() gives)
    # pid + random suffix: unique across processes and threads; "x" never clobbers a stranger.
    # The name's first 64 bytes only: a legal name of 234+ bytes plus the suffix would be too
    # long (bytes, not characters: 64 four-byte characters are 256).
    start = os.fsencode(base)[:64].decode(errors="ignore")
    tmp = os.path.join(folder, f".{start}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, mode.replace("w", "x"), **open_kwargs) as f:
            yield f
        if keep is not None:
            os.chmod(tmp, keep)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def validate_phy2log(phy2log, num_logical: int, num_ranks: int, name: str = "phy2log"
                     ) -> np.ndarray:
    """Checks a placement ``[P]`` or ``[L, P]``: ids in [0, E), every expert held at least once
    per layer, P divisible by num_ranks. Returns it as an int64 numpy array (a copy)."""
    num_logical = check_int(num_logical, "num_logical", 1)
    num_ranks = check_int(num_ranks, "num_ranks", 1)
    a = np.array(to_numpy(phy2log, name), copy=True)
    if a.dtype == object or not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{name} must hold integer expert ids, got dtype {a.dtype}")
    if a.dtype == np.uint64 and a.size and a.max() > np.iinfo(np.int64).max:
        # (the cast would wrap it to a negative id, and the error would name that)
        raise ValueError(f"{name} ids must lie in [0, {num_logical}), got {a.max()}")
    a = a.astype(np.int64)
    rows = a[None] if a.ndim == 1 else a
    if rows.ndim != 2 or rows.shape[1] == 0:
        raise ValueError(f"{name} must have shape [slots] or [layers, slots], got {a.shape}")
    if rows.shape[1] % num_ranks:
        raise ValueError(f"{name}: slots ({rows.shape[1]}) must be divisible by num_ranks "
                         f"({num_ranks})")
    if rows.shape[1] < num_logical:
        raise ValueError(f"{name}: slots ({rows.shape[1]}) must be >= logical experts "
                         f"({num_logical})")
    if rows.min() < 0 or rows.max() >= num_logical:
        raise ValueError(f"{name}: expert ids must lie in [0, {num_logical}), got "
                         f"[{rows.min()}, {rows.max()}]")
    for layer, row in enumerate(rows):
        missing = np.setdiff1d(np.arange(num_logical), row)
        if missing.size:
            raise ValueError(f"{name}: layer {layer} holds no copy of logical experts "
                             f"{missing[:8].tolist()}")
    return a


def check_writable_dir(path, name: str, *, create: bool = False) -> None:
    """ValueError naming ``name`` unless the folder ``path`` will be written into exists and
    takes new files (checked before the work whose result goes there, not found out after it).
    A file is written as a temporary beside it, then renamed: access() first, then a real
    temporary file, since read-only mounts and /proc answer access() yes for root.
    ``create``: a missing folder is made first (with its parents), as vllm-ascend makes
    expert_map_record_path's."""
    try:
        target, in_place, stream = write_target(path)
    except ValueError as e:
        raise ValueError(f"{name} {e}") from None
    if in_place:  # (a device or pipe, written in place: no folder involved)
        if stream is not None:
            return  # (written through the descriptor, open for writing; the path may not be)
        if not os.access(target, os.W_OK):
            raise ValueError(f"{name} {target!r} is not writable")
        return
    folder = os.path.dirname(target)
    if create and not os.path.isdir(folder):
        try:
            os.makedirs(folder, exist_ok=True)
        except (OSError, ValueError) as e:  # (ValueError: a NUL in the path)
            raise ValueError(f"{name} {os.fspath(path)!r}: folder {folder!r} cannot be made "
                             f"({getattr(e, 'strerror', None) or e})") from None
    if not os.path.isdir(folder):
        raise ValueError(f"{name} {os.fspath(path)!r}: folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{name} {os.fspath(path)!r}: folder {folder!r} is not writable")
    try:
        fd, probe = tempfile.mkstemp(prefix=".eplb-native-", dir=folder)
    except OSError as e:
        raise ValueError(f"{name} {os.fspath(path)!r}: folder {folder!r} takes no new file "
                         f"({e.strerror or e})") from None
    os.close(fd)
    os.unlink(probe)


def digest(a: np.ndarray | None) -> int:
    """blake2b of an array's shape and bytes in 7 bytes (it and its negation fit an int64),
    plus 1; 0 for None. For checking across ranks, in one all-reduce, that all hold the same."""
    if a is None:
        return 0
    a = np.ascontiguousarray(a)
    h = hashlib.blake2b(str((a.dtype.str, a.shape)).encode(), digest_size=7)
    h.update(a.tobytes())
    return 1 + int.from_bytes(h.digest(), "little")


def same_file(a, b) -> bool:
    """Whether two paths name one file (links followed; paths not both existing: the same
    real path; a device such as /dev/null, written in place, clashes with nothing)."""
    try:
        if not os.path.exists(a) or not os.path.exists(b):
            return os.path.realpath(a) == os.path.realpath(b)
        return os.path.samefile(a, b) and os.path.isfile(a)
    except (OSError, ValueError):
        return False


def all_numbers(doc) -> bool:
    """Whether a parsed JSON value is a number or nested lists of numbers (bools are not)."""
    stack = [doc]
    while stack:
        x = stack.pop()
        if isinstance(x, list):
            stack.extend(x)
        elif isinstance(x, bool) or not isinstance(x, int | float):
            return False
    return True


def load_torch(f, label: str):
    """``torch.load(f)`` of a file or stream as a trace or an SGLang start file is read (CPU,
    weights only: no code runs); any failure to parse is a ValueError naming ``label``."""
    import torch

    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a corrupt file fails anywhere in torch's unpickler
        text = str(e).strip().splitlines()
        raise ValueError(f"{label}: not a loadable torch file "
                         f"({(text[0] if text else type(e).__name__)[:200]})") from None
