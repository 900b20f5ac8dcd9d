"""Outputs (expert maps, traces, plots, the updator's record): a regular file is replaced whole
through a temporary beside it; a device or pipe is written in place; a link's target is
rewritten; what is neither is refused before any work (review15_cli: `-o /dev/null` as root put a
plain file where the device was)."""

from __future__ import annotations

import os
import stat
import threading

import numpy as np
import pytest

from eplb_native import _util, expert_map
from eplb_native._util import atomic_write, check_writable_dir, write_target


def test_regular_file_replaced_whole_keeping_its_mode(tmp_path):
    path = tmp_path / "map.json"
    path.write_text("old")
    os.chmod(path, 0o600)
    with atomic_write(path) as f:
        f.write("new")
    assert path.read_text() == "new"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.json"]
    with pytest.raises(RuntimeError), atomic_write(path) as f:
        f.write("half")
        raise RuntimeError
    assert path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.json"]


def test_a_link_is_followed_its_target_rewritten(tmp_path):
    real = tmp_path / "real.json"
    real.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    expert_map.save(link, np.array([[0, 1]]), 1)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert expert_map.load(real)[0].tolist() == [[0, 1]]
    dangling = tmp_path / "dangling.json"
    dangling.symlink_to(tmp_path / "made.json")
    expert_map.save(dangling, np.array([[1, 0]]), 1)
    assert dangling.is_symlink() and expert_map.load(tmp_path / "made.json")[0].tolist() == [[1, 0]]


def test_a_device_or_pipe_is_written_in_place(tmp_path):
    with atomic_write(os.devnull) as f:
        f.write("thrown away")
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)
    check_writable_dir(os.devnull, "-o")
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()))
    reader.start()
    expert_map.save(fifo, np.array([[0, 1]]), 1)
    reader.join(10)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert expert_map.from_json_dict(__import__("json").loads(got[0])).tolist() == [[0, 1]]


def test_what_is_neither_is_refused_naming_the_argument(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="-o .* is a directory"):
        check_writable_dir(tmp_path, "-o")
    import socket

    sock_path = tmp_path / "s"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock_path))
        with pytest.raises(ValueError, match="--png .* is not a regular file"):
            check_writable_dir(sock_path, "--png")
        with pytest.raises(ValueError, match="not a regular file"), atomic_write(sock_path):
            pass
    with pytest.raises(ValueError, match="expert_map_record_path .*NUL"):
        check_writable_dir("a\0b.json", "expert_map_record_path")
    # a read-only file (root may write it all the same: access() is asked, as open() would be)
    ro = tmp_path / "ro.json"
    ro.write_text("keep")
    real_access = os.access
    monkeypatch.setattr(_util.os, "access",
                        lambda p, m: False if os.fspath(p) == str(ro) else real_access(p, m))
    with pytest.raises(ValueError, match="-o .*ro.json' is read-only"):
        check_writable_dir(ro, "-o")
    with pytest.raises(ValueError, match="read-only"):
        expert_map.save(ro, np.array([[0, 1]]), 1)
    assert ro.read_text() == "keep"


def test_a_long_legal_name_is_written(tmp_path):
    """The temporary's name holds the first 64 bytes of the target's: a name of 250 bytes is
    legal and the suffix (pid, random) would have pushed it past the 255-byte limit; bytes, not
    characters (62 four-byte characters are 248 bytes)."""
    for name in ("b" * 245 + ".json", "\U0001f600" * 62 + ".json"):
        path = tmp_path / name
        expert_map.save(path, np.array([[0, 1]]), 1)
        assert expert_map.load(path)[0].tolist() == [[0, 1]]
        assert write_target(path) == (os.path.realpath(path), False, None)


def test_a_link_loop_is_refused(tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(ValueError, match="loop of symbolic links"):
        check_writable_dir(tmp_path / "a", "-o")
    assert (tmp_path / "a").is_symlink()


def test_the_file_stdout_goes_to_is_written_through_it(tmp_path):
    """-o /dev/stdout (or the name of the file stdout was redirected into) while stdout goes to
    a file: written through the stream at its position, so a log appended to keeps its lines
    and the run's own output stays in the file (the file was replaced: its earlier lines, or
    everything printed after, lost)."""
    import subprocess
    import sys

    log = tmp_path / "run.log"
    log.write_text("earlier line\n")
    code = ("import numpy as np, sys; from eplb_native import expert_map; print('before'); "
            "expert_map.save(sys.argv[1], np.array([[0, 1]]), 1); print('after')")
    for target in ("/dev/stdout", str(log)):
        with open(log, "a") as out:
            subprocess.run([sys.executable, "-c", code, target], stdout=out, check=True,
                           env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
                           timeout=60)
        text = log.read_text()
        assert text.startswith("earlier line\nbefore\n{"), text
        assert text.endswith("}\nafter\n") and '"moe_layer_count": 1' in text
        log.write_text("earlier line\n")
