"""Per-container monitor, started by the runtime, living as long as its container.

Why a shim: the agent may restart at any time while containers keep running, so nothing the
container needs may belong to the agent process. The shim (like containerd-shim or conmon, but
in stdlib Python) is detached into its own session and

- becomes a child subreaper and runs ``runc run -d``, so the container's init is reparented to
  it and its exit status can be collected (written to ``<bundle>/exit.json``; runc itself does
  not keep exit codes of detached containers);
- holds the read end of the pipe that is the container's stdout and stderr, and copies it into
  a size-capped log: ``LOG`` and ``LOG.1``, each at most half the limit, so the newest
  ``limit/2 .. limit`` bytes are kept;
- opens no socket, reads no input but the pipe.

Invocation (by :mod:`zos_agent.runtime`, which waits for the launcher to print one JSON line)::

    python -I -S shim.py RUNC RUNC_ROOT BUNDLE ID LOG LOG_LIMIT

The launcher prints ``{"ok": true, "pid": <container init>, "shim": <shim pid>}`` once the
container runs, or ``{"ok": false, "error": "..."}``, and exits. Only the standard library is
imported: the shim runs with ``-S`` to keep its footprint small.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import subprocess
import sys
import time

PR_SET_CHILD_SUBREAPER = 36
RUNC_TIMEOUT = 60.0
DRAIN_SECONDS = 2.0
_READ = 65536


class CappedLog:
    """Append-only log kept under ``limit`` bytes by rotating ``path`` to ``path.1``."""

    def __init__(self, path: str, limit: int) -> None:
        self.path = path
        self.half = max(limit // 2, 1024)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self.size = os.fstat(self.fd).st_size

    def write(self, data: bytes) -> None:
        if len(data) > self.half:
            data = data[-self.half :]
        if self.size + len(data) > self.half:
            os.close(self.fd)
            os.replace(self.path, self.path + ".1")
            self.fd = os.open(
                self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600
            )
            self.size = 0
        os.write(self.fd, data)
        self.size += len(data)


def _runc_error(bundle: str) -> str:
    """The last error runc logged (its --log is JSON lines)."""
    msg = ""
    try:
        with open(os.path.join(bundle, "runc.log"), "rb") as f:
            for line in f.read()[-65536:].splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if isinstance(entry, dict) and entry.get("level") in ("error", "fatal"):
                    msg = str(entry.get("msg", ""))
    except OSError:
        pass
    return msg


def _write_json_at(dir_fd: int, name: str, value: object) -> None:
    tmp = f".{name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600, dir_fd=dir_fd)
    try:
        os.write(fd, json.dumps(value).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def _proc_starttime(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return int(stat[stat.rindex(b")") + 2 :].split()[19])


def _monitor(argv: list[str], report_fd: int) -> int:
    runc, root, bundle, cid, log_path, limit = argv
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    # Held open so exit.json lands in this run's bundle even if the directory is replaced.
    bundle_fd = os.open(bundle, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    log = CappedLog(log_path, int(limit))
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    pid_file = os.path.join(bundle, "init.pid")
    try:
        os.unlink(pid_file)
    except FileNotFoundError:
        pass
    # One run's runc log at a time: bounded, and the error we report is this run's.
    os.close(os.open(os.path.join(bundle, "runc.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
    cmd = [runc, "--root", root, "--log", os.path.join(bundle, "runc.log"), "--log-format", "json",
           "run", "-d", "--bundle", bundle, "--pid-file", pid_file, cid]
    with open(os.devnull, "rb") as devnull:
        proc = subprocess.Popen(cmd, stdin=devnull, stdout=out_w, stderr=out_w, cwd="/")
    os.close(out_w)
    try:
        rc = proc.wait(timeout=RUNC_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = -1
    if rc != 0:
        err = _runc_error(bundle) or f"runc run exited {rc}"
        os.write(report_fd, json.dumps({"ok": False, "error": err}).encode())
        return 1
    with open(pid_file) as f:
        init_pid = int(f.read().strip())
    pidfd = os.pidfd_open(init_pid)
    me = os.getpid()
    _write_json_at(bundle_fd, "shim.json", {"pid": me, "starttime": _proc_starttime(me)})
    os.write(report_fd, json.dumps({"ok": True, "pid": init_pid, "shim": me}).encode())
    os.close(report_fd)

    poller = select.poll()
    poller.register(out_r, select.POLLIN)
    poller.register(pidfd, select.POLLIN)
    exit_code: int | None = None
    pipe_open = True
    deadline: float | None = None
    while pipe_open:
        timeout_ms = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
        events = poller.poll(timeout_ms)
        if not events and deadline is not None:
            break  # a process outside the pid namespace still holds the pipe: stop waiting
        for fd, _ in events:
            if fd == out_r:
                data = os.read(out_r, _READ)
                if data:
                    log.write(data)
                else:
                    pipe_open = False
            elif fd == pidfd:
                poller.unregister(pidfd)
                deadline = time.monotonic() + DRAIN_SECONDS
                try:
                    _, status = os.waitpid(init_pid, 0)
                    exit_code = os.waitstatus_to_exitcode(status)
                    if exit_code < 0:
                        exit_code = 128 - exit_code  # killed by a signal, shell convention
                except ChildProcessError:
                    exit_code = None  # not reparented to us (no subreaper support)
    if deadline is None:
        # The pipe closed first (the container closed its stdio); wait for init itself.
        try:
            _, status = os.waitpid(init_pid, 0)
            exit_code = os.waitstatus_to_exitcode(status)
            if exit_code < 0:
                exit_code = 128 - exit_code
        except ChildProcessError:
            exit_code = None
    try:
        _write_json_at(bundle_fd, "exit.json", {"exit_code": exit_code, "time": time.time()})
    except OSError:
        pass  # the bundle was deleted meanwhile
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 6:
        print(json.dumps({"ok": False, "error": "usage: shim.py RUNC ROOT BUNDLE ID LOG LIMIT"}))
        return 2
    report_r, report_w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(report_r)
        os.setsid()
        # Detach from the launcher's stdio so the agent's capture pipes see EOF.
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
        code = 1
        try:
            code = _monitor(argv, report_w)
        except BaseException as exc:  # report anything, never leave the launcher hanging
            try:
                os.write(report_w, json.dumps({"ok": False, "error": f"shim: {exc!r}"}).encode())
            except OSError:
                pass
        os._exit(code)
    os.close(report_w)
    chunks = []
    while chunk := os.read(report_r, 65536):
        chunks.append(chunk)
    os.waitpid(child, os.WNOHANG)
    msg = b"".join(chunks).decode(errors="replace") or json.dumps(
        {"ok": False, "error": "shim exited without reporting"}
    )
    print(msg)
    return 0 if json.loads(msg).get("ok") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
