"""One warm worker of the local OpenWhisk fabric: a separate Python process
that loads an action's code once and runs `main(args)` for many activations.

It is started by the fabric as a plain script (`python worker.py FD DIR MAIN
CONCURRENCY`), not as a module of the fedkeeper package, so that a worker
imports nothing of the keeper: only the action's own code, which comes first
on sys.path exactly as the unpacked zip does in an OpenWhisk python runtime.

A stem cell (`python worker.py FD --stem MODULE...`) is a worker started
before any action needs it, as OpenWhisk's prewarmed containers: it imports
its runtime's heavy modules (numpy, TensorFlow, ...) and waits; the fabric
then hands it an action's code (an `init` message) and it becomes that
action's worker, so that the action's cold start is only its code load.
A zygote (`python worker.py FD --zygote MODULE...`) imports the modules
once and forks stem cells on request, so that a runtime's heavy modules
are loaded once per fabric, not once per worker (see `zygote`).

Protocol on the inherited socket FD: frames of a 4-byte big-endian length and
a UTF-8 JSON object (never pickle: the action's results are untrusted data).
  worker -> fabric  {"t": "stem", "init_ms": float}    (a stem cell's modules are loaded)
                    {"t": "ready", "init_ms": float}
                    {"t": "init_error", "error": str}
                    {"t": "done", "id": str, "result": {...}}
                    {"t": "done", "id": str, "dev_error": str}
  fabric -> worker  {"t": "init", "code_dir": str, "main": str, "concurrency": int,
                     "log": str}                    (to a stem cell, once)
                    {"t": "run", "id": str, "args": {...}, "env": {...},
                     "slow_ms": int, "crash": bool, "hang": bool}
The action's stdout and stderr go to the log file the fabric opened for it;
they never share the protocol socket.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import signal
import socket
import struct
import sys
import threading
import time
import traceback

_HDR = struct.Struct(">I")
# How a stem cell imports its runtime's modules, shared with the local Cloud Functions host.
PRELOADING = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "preloading.py")
# OpenWhisk's size limit on a result; a bigger one is a developer error.
MAX_RESULT_BYTES = 1024 * 1024


def recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


class Channel:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.lock = threading.Lock()

    def send(self, msg: dict) -> None:
        data = json.dumps(msg, separators=(",", ":")).encode()
        with self.lock:
            self.sock.sendall(_HDR.pack(len(data)) + data)

    def recv(self) -> dict | None:
        hdr = recv_exact(self.sock, 4)
        if hdr is None:
            return None
        body = recv_exact(self.sock, _HDR.unpack(hdr)[0])
        return None if body is None else json.loads(body)


def _load_main(code_dir: str, main_name: str):
    entry = os.path.join(code_dir, "__main__.py")
    if not os.path.isfile(entry):
        raise RuntimeError("the action's zip has no __main__.py")
    # The module is not named "__main__", so that an `if __name__ ==
    # "__main__":` block in the action does not run at load time.
    spec = importlib.util.spec_from_file_location("__ow_action__", entry)
    module = importlib.util.module_from_spec(spec)
    sys.modules["__ow_action__"] = module
    spec.loader.exec_module(module)
    fn = getattr(module, main_name, None)
    if not callable(fn):
        raise RuntimeError(f"the action's __main__.py defines no function {main_name!r}")
    return fn


def _run(chan: Channel, fn, msg: dict) -> None:
    aid = msg["id"]
    try:
        if msg.get("crash"):
            # Injected crash: the process dies under the activation, as a
            # container does when its runtime is killed.
            os._exit(70)
        if msg.get("hang"):
            # Injected timeout: the activation never returns; the fabric
            # ends it at its time limit by killing this process.
            threading.Event().wait()
        os.environ.update(msg.get("env") or {})
        slow = msg.get("slow_ms") or 0
        if slow:
            time.sleep(slow / 1000.0)
        result = fn(msg.get("args") or {})
    except BaseException as exc:  # any failure of the action is its developer's error
        traceback.print_exc()
        sys.stderr.flush()
        chan.send({"t": "done", "id": aid,
                   "dev_error": f"The action raised an exception: {type(exc).__name__}: {exc}"})
        return
    if not isinstance(result, dict):
        chan.send({"t": "done", "id": aid, "dev_error":
                   f"The action did not produce a valid JSON response: {type(result).__name__} "
                   "instead of a dictionary."})
        return
    try:
        # allow_nan=False: NaN and Infinity are not JSON; OpenWhisk refuses them.
        text = json.dumps(result, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        chan.send({"t": "done", "id": aid,
                   "dev_error": f"The action did not produce a valid JSON response: {exc}"})
        return
    if len(text) > MAX_RESULT_BYTES:
        chan.send({"t": "done", "id": aid, "dev_error":
                   "The action produced a response that exceeded the allowed length: "
                   f"{len(text)} > {MAX_RESULT_BYTES} bytes."})
        return
    chan.send({"t": "done", "id": aid, "result": result})


def _load_code(chan: Channel, code_dir: str, main_name: str):
    """The action's main function, its code load reported as `ready` (or
    `init_error`, then None)."""
    sys.path.insert(0, code_dir)
    os.chdir(code_dir)
    t0 = time.perf_counter()
    try:
        fn = _load_main(code_dir, main_name)
    except BaseException as exc:
        traceback.print_exc()
        sys.stderr.flush()
        chan.send({"t": "init_error", "error": f"{type(exc).__name__}: {exc}"})
        return None
    chan.send({"t": "ready", "init_ms": (time.perf_counter() - t0) * 1000.0})
    return fn


def _serve_runs(chan: Channel, fn, concurrency: int) -> None:
    while True:
        msg = chan.recv()
        if msg is None:  # the fabric closed the socket: retire
            return
        if msg.get("t") != "run":
            continue
        if concurrency <= 1:
            _run(chan, fn, msg)
        else:
            # Intra-container concurrency, as OpenWhisk's limits.concurrency:
            # the fabric never sends more than `concurrency` at once.
            threading.Thread(target=_run, args=(chan, fn, msg), daemon=True).start()


def _leave_package_dir() -> None:
    # The fabric's package directory must not shadow the action's modules.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]


def serve(fd: int, code_dir: str, main_name: str, concurrency: int) -> None:
    _leave_package_dir()
    chan = Channel(socket.socket(fileno=fd))
    fn = _load_code(chan, code_dir, main_name)
    if fn is not None:
        _serve_runs(chan, fn, concurrency)


def _import_all(modules: list[str]) -> float:
    """Import the runtime's modules (fedkeeper/local/preloading.py, loaded
    by path: this process may not import FedKeeper); milliseconds it took."""
    t0 = time.perf_counter()
    spec = importlib.util.spec_from_file_location("_fk_preloading", PRELOADING)
    preloading = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(preloading)
    preloading.import_all(modules)
    sys.stderr.flush()
    return (time.perf_counter() - t0) * 1000.0


def zygote(fd: int, modules: list[str]) -> None:
    """The parent of a runtime's stem cells: it loads the runtime's modules
    once, then forks a stem cell for every request, which starts with them
    loaded (its pages shared with this process until written). It runs no
    action code and no TensorFlow op, so forking it is safe: nothing but
    imported modules (no thread, lock or session state of an action) is
    copied.
    Protocol on FD: zygote -> fabric {"t": "zygote", "init_ms": float},
    then a one-byte request carrying the new cell's socket (SCM_RIGHTS)
    answered by {"t": "forked", "pid": int} (or {"t": "fork_error", ...})."""
    _leave_package_dir()
    sock = socket.socket(fileno=fd)
    chan = Channel(sock)
    loaded_ms = _import_all(modules)
    # the cells are this process's children: reaped by the kernel, not waited for
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    chan.send({"t": "zygote", "init_ms": loaded_ms})
    while True:
        try:
            _, fds, _, _ = socket.recv_fds(sock, 1, 1)
        except OSError:
            return
        if not fds:  # the fabric closed the socket
            return
        cell_fd = fds[0]
        for extra in fds[1:]:
            os.close(extra)
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(cell_fd)
            chan.send({"t": "fork_error", "error": str(exc)})
            continue
        if pid == 0:  # the new stem cell
            try:
                sock.close()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                _fresh_entropy()
                _stem_serve(Channel(socket.socket(fileno=cell_fd)), 0.0)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(0)
        os.close(cell_fd)
        chan.send({"t": "forked", "pid": pid})


def _fresh_entropy() -> None:
    """A forked cell draws from its own entropy, as a process started on its
    own does: Python's `random` reseeds itself after a fork, numpy's legacy
    global generator (seeded from the OS when numpy was imported) does not."""
    np_random = sys.modules.get("numpy.random")   # numpy 2 imports it on first use only
    if np_random is not None:
        np_random.seed()


def stem(fd: int, modules: list[str]) -> None:
    """A stem cell: load the runtime's modules, then wait for an action's code."""
    _leave_package_dir()
    chan = Channel(socket.socket(fileno=fd))
    _stem_serve(chan, _import_all(modules))


def _stem_serve(chan: Channel, loaded_ms: float) -> None:
    chan.send({"t": "stem", "init_ms": loaded_ms})
    while True:
        msg = chan.recv()
        if msg is None:
            return
        if msg.get("t") == "init":
            break
    # From here on the output is the action's, in its log, as a worker
    # started for it writes there.
    log_fd = os.open(str(msg["log"]), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    sys.stdout.flush()
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    fn = _load_code(chan, str(msg["code_dir"]), str(msg.get("main") or "main"))
    if fn is not None:
        _serve_runs(chan, fn, int(msg.get("concurrency") or 1))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[2] == "--stem":
        stem(int(sys.argv[1]), sys.argv[3:])
    elif len(sys.argv) > 2 and sys.argv[2] == "--zygote":
        zygote(int(sys.argv[1]), sys.argv[3:])
    else:
        serve(int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
