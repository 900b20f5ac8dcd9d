"""Behaviours the code claims that no other test drove: Ctrl-C (exit 130, no partial output,
demo's ranks ended), outputs that are sockets or not writable, stdout a socket, traces read from
a named pipe, and fork after a Planner's or the updator recorder's thread started.

Each waits for a marker (a line on a pipe, a FIFO's reader) before it signals: no fixed sleeps.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import eplb_native
from eplb_native import expert_map
from eplb_native.traces import save_trace, synth

PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(eplb_native.__file__)))
TIMEOUT = 120  # a bound for a hang, never waited out by a passing test


def _env() -> dict:
    path = os.pathsep.join([PKG_PARENT, os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path, MPLBACKEND="Agg")


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "eplb_native.cli", *map(str, args)]


def _run(argv, cwd, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("capture_output", True)
    return subprocess.run(argv, cwd=cwd, env=_env(), text=True, timeout=TIMEOUT, **kw)


def _assert_one_line_error(proc, command, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"eplb-native {command}: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def _read_until(proc, stream, marker: bytes) -> bytes:
    """What ``stream`` (a pipe from ``proc``, binary) gave up to and including ``marker``; fails
    if the process ends first or nothing comes within TIMEOUT."""
    fd, got = stream.fileno(), b""
    deadline = time.monotonic() + TIMEOUT
    while marker not in got:
        left = deadline - time.monotonic()
        assert left > 0, f"no {marker!r} within {TIMEOUT} s: {got[-2000:]!r}"
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 65536)
            assert chunk, f"ended (rc {proc.wait()}) before {marker!r}: {got[-2000:]!r}"
            got += chunk
    return got


def _open_fifo_writer(fifo, proc) -> int:
    """The write end of ``fifo``, once ``proc`` holds its read end (a non-blocking open is
    refused with ENXIO until a reader has it open): the sign that ``proc`` is reading it."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            assert proc.poll() is None, (proc.returncode, proc.communicate())
            assert time.monotonic() < deadline, f"nobody opened {fifo} for reading"
            time.sleep(0.01)
            continue
        os.set_blocking(fd, True)
        return fd


def _names(folder) -> list[str]:
    return sorted(os.listdir(folder))


def _old_map(path, layers: int, experts: int, ranks: int = 4) -> None:
    """An expert map for plan's --old: each layer's experts in slot order, no redundant slot."""
    expert_map.save(path, np.tile(np.arange(experts), (layers, 1)), ranks)


@pytest.fixture()
def trace(tmp_path):
    """A small trace t.npz in tmp_path (3 layers x 16 experts, 7 windows), old.json a map of
    it on 4 ranks."""
    save_trace(tmp_path / "t.npz", synth(7, 3, 16, tokens_per_window=512, top_k=2, seed=5))
    _old_map(tmp_path / "old.json", 3, 16)
    return tmp_path / "t.npz"


# --------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_while_reading_the_trace_exits_130_and_keeps_the_output(tmp_path, trace):
    """SIGINT while plan waits on its --load (a named pipe nobody has written yet): exit 130
    with one line and no traceback; the -o file of an earlier run untouched, no temporary
    left (cli.main: KeyboardInterrupt -> 130)."""
    (tmp_path / "m.json").write_text("earlier map\n")
    fifo = tmp_path / "pipe.npz"
    os.mkfifo(fifo)
    proc = subprocess.Popen(_cli("plan", "--load", "pipe.npz", "--ranks", 4, "-o", "m.json"),
                            cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    fd = _open_fifo_writer(fifo, proc)  # plan is in load_trace now, waiting for bytes
    try:
        proc.send_signal(signal.SIGINT)
    finally:
        # End of file, then: a signal taken just before the read began (CPython runs its handler
        # between bytecodes; the read is not interrupted) is raised once the read returns,
        # instead of waiting for bytes. Without the interrupt, the empty archive would be exit 2.
        os.close(fd)
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 130, (proc.returncode, out, err)
    assert err == "eplb-native plan: interrupted\n" and out == ""
    assert (tmp_path / "m.json").read_text() == "earlier map\n"
    assert _names(tmp_path) == ["m.json", "old.json", "pipe.npz", "t.npz"]


# The CLI with every atomic_write stopped midway: a partial temporary written, then a marker on
# stderr, then waiting for the test's SIGINT (the KeyboardInterrupt is raised in the write).
# Short sleeps, not signal.pause(): a signal taken just before pause() began would leave it
# waiting for another.
MIDWAY = textwrap.dedent("""
    import contextlib, sys, time
    from eplb_native import _util, cli, expert_map, traces

    real = _util.atomic_write

    @contextlib.contextmanager
    def midway(path, mode="w", **kw):
        with real(path, mode, **kw) as f:
            f.write(b"partial" if "b" in mode else "partial")
            f.flush()
            sys.stderr.write("MIDWAY\\n")
            sys.stderr.flush()
            while True:
                time.sleep(0.01)
            yield f

    for module in (cli, expert_map, traces):
        module.atomic_write = midway
    sys.exit(cli.main(sys.argv[1:]))
""")


@pytest.mark.parametrize("command, args, output", [
    ("plan", ["--load", "t.npz", "--old", "old.json", "-o", "out.json"], "out.json"),
    ("synth", ["--shape", "custom", "--layers", 2, "--experts", 8, "--windows", 3,
               "-o", "out.npz"], "out.npz"),
])
def test_ctrl_c_in_the_middle_of_a_write_leaves_the_old_file(tmp_path, trace, command, args,
                                                             output):
    """SIGINT while the output's temporary is half written: exit 130, the file of an earlier
    run intact, the temporary removed (atomic_write: replaced only when the write completes)."""
    (tmp_path / output).write_bytes(b"earlier run\n")
    proc = subprocess.Popen([sys.executable, "-c", MIDWAY, command, *map(str, args)],
                            cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    _read_until(proc, proc.stderr, b"MIDWAY\n")
    before = sorted({output, "old.json", "t.npz"})
    temporaries = sorted(set(_names(tmp_path)) - set(before))
    assert len(temporaries) == 1, _names(tmp_path)  # the half-written temporary, beside it
    assert (tmp_path / temporaries[0]).read_bytes() == b"partial"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 130, (proc.returncode, out, err)
    assert err.decode() == f"eplb-native {command}: interrupted\n"
    assert (tmp_path / output).read_bytes() == b"earlier run\n"
    assert _names(tmp_path) == before


def _cmdline(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return None


def _children(pid: int) -> dict[int, str]:
    """pid -> command line of the live processes whose parent is ``pid`` (from /proc)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # (ended meanwhile)
            continue
        cmd = _cmdline(int(entry)) if ppid == pid else None
        if cmd is not None:
            found[int(entry)] = cmd
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds the ranks through /proc")
def test_ctrl_c_of_demo_alone_ends_its_ranks(tmp_path):
    """SIGINT to demo's process alone (kill -INT, not the terminal's process group) once its
    ranks are stepping: exit 130 with one line, every rank process ended before demo exits,
    no --save-trace file written (cmd_demo terminates the ranks on KeyboardInterrupt)."""
    proc = subprocess.Popen(
        _cli("demo", "--ranks", 2, "--layers", 2, "--experts", 8, "--redundant", 2, "--top-k", 2,
             "--steps", 100000, "--interval", 2, "--tokens", 16, "--hidden", 16, "--png", "",
             "--save-trace", "trace.npz"),
        cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ranks = {}
    try:
        _read_until(proc, proc.stderr, b" step 2/100000 ")  # rank 0's progress: ranks stepping
        ranks = {pid: cmd for pid, cmd in _children(proc.pid).items() if "spawn_main" in cmd}
        assert len(ranks) == 2, _children(proc.pid)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid, cmd in ranks.items():  # (a failed run: its ranks, not a later process)
            if _alive(pid) and _cmdline(pid) == cmd:
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 130, (proc.returncode, out, err[-2000:])
    assert err.decode().splitlines()[-1] == "eplb-native demo: interrupted", err[-2000:]
    assert b"Traceback" not in err and out == b""
    assert not [pid for pid in ranks if _alive(pid)]
    assert _names(tmp_path) == []


# --------------------------------------------------------------------------- where outputs go


@pytest.mark.parametrize("command, args, flag, sock", [
    # --load does not exist: the output is refused before anything is read
    ("plan", ["--load", "missing.npz", "--ranks", 4, "-o", "s.json"], "-o", "s.json"),
    ("synth", ["--shape", "custom", "--layers", 2, "--experts", 8, "-o", "s.npz"], "-o", "s.npz"),
    ("simulate", ["--trace", "t.npz", "--ranks", 4, "--png", "s.png"], "--png", "s.png"),
    # refused before the ranks start
    ("demo", ["--png", "s.png"], "--png", "s.png"),
    ("demo", ["--png", "", "--save-trace", "s.npz"], "--save-trace", "s.npz"),
])
def test_a_socket_as_the_output_is_refused(tmp_path, trace, monkeypatch, command, args, flag,
                                           sock):
    monkeypatch.chdir(tmp_path)  # (a relative name: AF_UNIX paths are limited to 107 bytes)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(sock)
        proc = _run(_cli(command, *args), tmp_path)
        _assert_one_line_error(proc, command, f"{flag} '{sock}' is not a regular file")
        assert stat.S_ISSOCK(os.stat(sock).st_mode)
    assert _names(tmp_path) == sorted({sock, "old.json", "t.npz"})


def _drop_dac_override():
    # PR_CAPBSET_DROP (24) of CAP_DAC_OVERRIDE (1): after exec root keeps its other capabilities
    # but obeys permission bits on writes, as any user does
    if ctypes.CDLL(None, use_errno=True).prctl(24, 1, 0, 0, 0) != 0:
        os._exit(97)


@pytest.fixture()
def as_a_user():
    """subprocess.run keywords under which permission bits are obeyed: none for a user; for
    root, CAP_DAC_OVERRIDE dropped in the child (skipped where that cannot be done)."""
    if os.geteuid() != 0:
        return {}
    probe = subprocess.run([sys.executable, "-c", "pass"], preexec_fn=_drop_dac_override,
                           timeout=TIMEOUT)
    if probe.returncode != 0:
        pytest.skip("running as root, and CAP_DAC_OVERRIDE cannot be dropped: root writes "
                    "read-only files")
    return {"preexec_fn": _drop_dac_override}


@pytest.mark.parametrize("command, args, fragment", [
    ("plan", ["--load", "missing.npz", "--ranks", 4, "-o", "ro.json"], "-o 'ro.json' is read-only"),
    ("simulate", ["--trace", "t.npz", "--ranks", 4, "--png", "ro.png"],
     "--png 'ro.png' is read-only"),
    ("synth", ["--shape", "custom", "--layers", 2, "--experts", 8, "-o", "rodir/t.npz"],
     "rodir' is not writable"),
    ("demo", ["--png", "rodir/d.png"], "rodir' is not writable"),
])
def test_an_output_without_write_permission_is_refused(tmp_path, trace, as_a_user, command,
                                                       args, fragment):
    """A read-only file, or a file in a read-only folder: one line naming the flag before any
    work (plan's --load is missing: not read), the file as it was."""
    for name in ("ro.json", "ro.png"):
        (tmp_path / name).write_text("keep")
        (tmp_path / name).chmod(0o444)
    (tmp_path / "rodir").mkdir()
    (tmp_path / "rodir").chmod(0o555)
    proc = _run(_cli(command, *args), tmp_path, **as_a_user)
    assert proc.returncode != 97, "dropping CAP_DAC_OVERRIDE failed"
    _assert_one_line_error(proc, command, fragment)
    assert (tmp_path / "ro.json").read_text() == (tmp_path / "ro.png").read_text() == "keep"
    assert _names(tmp_path / "rodir") == []
    assert _names(tmp_path) == ["old.json", "ro.json", "ro.png", "rodir", "t.npz"]


def _run_into_socket(argv, cwd, close_reader=False) -> tuple[int, bytes, str]:
    """Runs ``argv`` with stdout one end of a socketpair -> (exit status, what came through the
    other end, stderr); ``close_reader``: the other end closed before it starts."""
    reader, writer = socket.socketpair()
    with reader, writer:
        if close_reader:
            reader.close()
        proc = subprocess.Popen(argv, cwd=cwd, env=_env(), stdout=writer,
                                stderr=subprocess.PIPE)
        writer.close()
        data = b""
        while not close_reader:
            chunk = reader.recv(65536)
            if not chunk:
                break
            data += chunk
        err = proc.communicate(timeout=TIMEOUT)[1]
    return proc.returncode, data, err.decode()


def test_stdout_a_socket(tmp_path, trace):
    """stdout a socket (a service capturing the output): --json goes through it whole, the -o
    file written; -o /dev/stdout writes the map through it before the summary; -o /dev/stdout
    beside --json is refused (two documents in one stream); a reader that left is no error."""
    plan = ["plan", "--load", "t.npz", "--old", "old.json"]
    rc, data, err = _run_into_socket(_cli(*plan, "-o", "m.json", "--json"), tmp_path)
    assert rc == 0 and err == "", err
    result = json.loads(data)
    assert result["output"] == "m.json" and result["num_ranks"] == 4
    assert json.loads((tmp_path / "m.json").read_text())["moe_layer_count"] == 3
    rc, data, err = _run_into_socket(_cli(*plan, "-o", "/dev/stdout"), tmp_path)
    assert rc == 0 and err == "", err
    document, end = json.JSONDecoder().raw_decode(data.decode())
    assert document["moe_layer_count"] == 3
    summary = data.decode()[end:].lstrip("\n")
    assert summary.startswith("load: t.npz") and summary.endswith("wrote /dev/stdout\n")
    for command, args, flag in [("plan", ["--load", "t.npz", "-o", "/dev/stdout"], "-o"),
                                ("simulate", ["--trace", "t.npz", "--png", "/dev/stdout"],
                                 "--png")]:
        rc, data, err = _run_into_socket(_cli(command, *args, "--ranks", 4, "--json"), tmp_path)
        assert rc == 2 and data == b"", (rc, data, err)
        assert err == (f"eplb-native {command}: error: {flag} /dev/stdout is stdout, where --json "
                       f"prints the result: write the file elsewhere, or leave --json out\n")
    # the reader gone: quiet, the command's status or a SIGPIPE death's (as for a pipe)
    (tmp_path / "m.json").unlink()
    rc, _, err = _run_into_socket(_cli(*plan, "-o", "m.json", "--json"), tmp_path,
                                  close_reader=True)
    assert rc in (0, 141) and err == "", (rc, err)
    assert (tmp_path / "m.json").is_file()


# --------------------------------------------------------------------------- traces from a pipe


@pytest.mark.parametrize("ext", [".npz", ".json", ".npy", ".pt"])
def test_a_trace_from_a_named_pipe(tmp_path, ext):
    """`plan --load` a named pipe: every format is read (.npz, .npy and .pt whole into memory
    first: numpy's and torch's readers seek back in the stream, which a pipe cannot), and the
    pipe is left a pipe."""
    loads = np.arange(1, 49, dtype=np.int64).reshape(2, 3, 8)
    src = tmp_path / f"src{ext}"
    if ext == ".npz":
        save_trace(src, loads)
    elif ext == ".json":
        src.write_text(json.dumps(loads.tolist()))
    elif ext == ".npy":
        np.save(src, loads)
    else:
        torch = pytest.importorskip("torch")
        torch.save(torch.from_numpy(loads), src)
    blob = src.read_bytes()
    assert len(blob) < 16384  # (fits a pipe's buffer: the write never waits for the reader)
    _old_map(tmp_path / "old.json", 3, 8)
    fifo = tmp_path / f"pipe{ext}"
    os.mkfifo(fifo)
    proc = subprocess.Popen(_cli("plan", "--load", fifo.name, "--old", "old.json", "--json",
                                 "-o", "m.json"), cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    fd = _open_fifo_writer(fifo, proc)
    try:
        os.write(fd, blob)
    except BrokenPipeError:  # (the reader gave up already)
        pass
    finally:
        os.close(fd)
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, (proc.returncode, err)
    result = json.loads(out)
    assert result["windows"] == 2 and result["num_layers"] == 3
    assert result["num_experts"] == 8
    assert json.loads((tmp_path / "m.json").read_text())["moe_layer_count"] == 3
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


# --------------------------------------------------------------------------- fork


def _run_script(script: str) -> subprocess.CompletedProcess:
    """A script of its own process: the test process never forks with threads running."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True,
                          text=True, timeout=TIMEOUT,
                          env=dict(_env(), PYTHONWARNINGS="ignore::DeprecationWarning"))


def test_planner_after_fork_child_closes_or_drops_it_and_exits():
    """A child forked after the Planner's threads started: submit refused with a clear error;
    close(), or dropping it, returns at once (the threads are the parent's: nothing joined),
    and the child's normal exit (atexit's _stop_all) does not hang; the parent's Planner plans
    on as before."""
    out = _run_script("""
        import gc, os, sys
        import numpy as np
        import eplb_native

        load = np.arange(1, 9, dtype=np.float64).reshape(1, 8)
        planner = eplb_native.Planner()
        want = planner.submit(load, num_ranks=2, num_replicas=8).result(60).phy2log
        for how in ("close", "drop"):
            pid = os.fork()
            if pid == 0:
                try:
                    planner.submit(load, num_ranks=2, num_replicas=8)
                except RuntimeError as e:
                    print(how, "refused:", e, flush=True)
                else:
                    os._exit(5)
                if how == "close":
                    planner.close()
                else:
                    del planner
                    gc.collect()
                sys.exit(0)  # the interpreter's own exit: atexit handlers run
            _, status = os.waitpid(pid, 0)
            print(how, "child exit", os.waitstatus_to_exitcode(status), flush=True)
        got = planner.submit(load, num_ranks=2, num_replicas=8).result(60).phy2log
        planner.close()
        print("parent plans as before:", np.array_equal(got, want))
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    refusal = ("refused: this eplb_native.Planner was created in another process (before a "
               "fork); create a new Planner in the child")
    assert lines == [f"close {refusal}", "close child exit 0", f"drop {refusal}",
                     "drop child exit 0", "parent plans as before: True"], out.stdout


def test_updator_record_after_fork_is_written_by_the_childs_own_thread(tmp_path):
    """The recorder's thread started in the parent (a rebalance recorded), then fork: in the
    child a rebalance's record is written before shutdown, by a record thread of the child's
    own (the parent's executor has no thread there: a job queued on it never ran), and the
    child's shutdown returns with the final map written; the parent's placement, record and
    shutdown are its own."""
    record = tmp_path / "record.json"
    out = _run_script(f"""
        import os, threading, time
        import numpy as np
        import torch
        import eplb_native
        from eplb_native import expert_map
        from eplb_native.nn import EPMoE

        torch.set_num_threads(1)
        record = {str(record)!r}

        class Stack(torch.nn.Module):
            def __init__(self, n):
                super().__init__()
                self.layers = torch.nn.ModuleList(
                    [EPMoE(8, 6, 8, 2, seed=i, num_redundant_experts=2) for i in range(n)])

            def forward(self, x):
                for layer in self.layers:
                    x = x + layer(x)
                return x

        def recorded():
            try:
                return expert_map.load(record, num_ranks=1)[0].tolist()
            except (OSError, ValueError):
                return None

        def wait_for(placement):
            deadline = time.monotonic() + 60
            while recorded() != placement.tolist() and time.monotonic() < deadline:
                time.sleep(0.005)
            return recorded() == placement.tolist()

        def record_threads():
            return [t for t in threading.enumerate() if t.name.startswith("eplb-native-record")]

        model = Stack(2)
        up = eplb_native.attach(model, {{"step_interval": 1000,
                                         "expert_map_record_path": record}})
        first = np.array([[7, 6, 5, 4, 3, 2, 1, 0, 7, 7], [0, 0, 0, 1, 2, 3, 4, 5, 6, 7]])
        second = first[:, ::-1].copy()
        up.move_to(first)
        for _ in range(2):  # one layer a step; the record once both switched
            model(torch.randn(9, 8))
        assert wait_for(first) and len(record_threads()) == 1
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                assert record_threads() == []  # (threads do not survive a fork)
                up.move_to(second)
                for _ in range(2):
                    model(torch.randn(9, 8))
                print("child recorded before shutdown:", wait_for(second), flush=True)
                print("child record threads:", len(record_threads()), flush=True)
                up.shutdown()
                print("child after shutdown:", recorded() == second.tolist(),
                      len(record_threads()), flush=True)
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        print("child exit", os.waitstatus_to_exitcode(status))
        assert np.array_equal(up.phy2log(), first)
        up.shutdown()
        print("parent after shutdown:", recorded() == first.tolist(), len(record_threads()))
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines() == [
        "child recorded before shutdown: True", "child record threads: 1",
        "child after shutdown: True 0", "child exit 0", "parent after shutdown: True 0"], (
        out.stdout, out.stderr[-3000:])
