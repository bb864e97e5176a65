"""A program built on forkserver's socketserver classes keeps its own children.

The program serves in its main thread, as socketserver programs do (with
``serve_forever()``, on the default path and on the hook path, and with a
``handle_request()`` loop), while another thread loads it with clients (some
of whose children die by SIGKILL, with no exit note) and a third runs
``subprocess.run()`` and ``os.fork()`` children of its own: every one of
those exit statuses must arrive intact (CPython issue 1540386), and the
server's own children must all be reaped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

_PROGRAM = """
    import os, signal, socket, subprocess, sys, threading, time
    import socketserver
    import forkserver

    MODE = sys.argv[1]

    class Echo(socketserver.StreamRequestHandler):
        def handle(self):
            line = self.rfile.readline()
            if line == b"die\\n":
                os.kill(os.getpid(), signal.SIGKILL)  # no exit note: reaped all the same
            self.wfile.write(line)

    class Checked(forkserver.ForkingTCPServer):
        def verify_request(self, request, client_address):  # the hook path
            return True

    cls = Checked if MODE == "hook-path" else forkserver.ForkingTCPServer
    server = cls(("127.0.0.1", 0), Echo)
    server.timeout = 0.05
    ROUNDS = 20
    statuses = []
    done = threading.Event()

    def load():
        for i in range(150):
            line = b"die\\n" if i % 10 == 0 else b"ping\\n"
            with socket.create_connection(server.server_address, timeout=10) as s:
                s.sendall(line)
                got = s.recv(10)
                assert got == (b"" if line == b"die\\n" else line), got

    def own_children():
        try:
            loader = threading.Thread(target=load)
            loader.start()
            for i in range(ROUNDS):
                code = i % 7 + 1  # never 0: a status lost to someone else's waitpid reads 0
                ran = subprocess.run([sys.executable, "-c", f"raise SystemExit({code})"])
                statuses.append(("run", code, ran.returncode))
                pid = os.fork()
                if pid == 0:
                    os._exit(code + 10)
                _, status = os.waitpid(pid, 0)
                statuses.append(("fork", code + 10, os.waitstatus_to_exitcode(status)))
            loader.join()
        finally:
            done.set()
            if MODE != "handle-request":
                server.shutdown()

    threading.Thread(target=own_children).start()
    if MODE == "handle-request":
        while not done.is_set():
            server.handle_request()  # handle_timeout() reaps, as ForkingMixIn's does
    else:
        server.serve_forever()
    server.server_close()  # block_on_close: waits for the last children
    print("RESULT", repr(statuses), server.active_children, flush=True)
"""


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", ["default-path", "hook-path", "handle-request"])
def test_a_socketserver_program_keeps_its_own_childrens_statuses(tmp_path: Path, mode: str) -> None:
    script = tmp_path / "program.py"
    script.write_text(textwrap.dedent(_PROGRAM))
    proc = subprocess.Popen(
        [sys.executable, str(script), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=80)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    assert proc.returncode == 0, err
    [line] = [line for line in out.splitlines() if line.startswith("RESULT")]
    statuses_text, active = line.split(" ", 1)[1].rsplit(" ", 1)
    statuses = eval(statuses_text)  # the repr the program printed
    assert len(statuses) == 40
    assert all(expected == got for _, expected, got in statuses), statuses
    assert active == "None"  # every child of the server's reaped
    assert err.count("killed by SIGKILL") == 15, err  # reaped and logged, each
