"""Does the server stop working for a client that was killed mid-request (no deadline)?

Usage::

    python bench/serving_cancel.py EXPORT_DIR [--wait 9]

Starts ``charrnn serve`` on EXPORT_DIR (127.0.0.1, a free port), runs a client process that
asks for 64 rows x 10,000 characters without a deadline, kills it with SIGKILL after
``--wait`` seconds (long enough for its request to be running), then prints the CPU time the
server used in the next 5 seconds: the work still done for nobody.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process (fields 14 and 15 of /proc/<pid>/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("export_dir")
    parser.add_argument("--wait", type=float, default=9.0)
    args = parser.parse_args()
    log = Path(tempfile.mkdtemp()) / "serve.log"
    argv = [sys.executable, "-m", "charrnn_keras.cli", "serve", "--export-dir", args.export_dir,
            "--port", "0"]  # fmt: skip
    with log.open("wb") as out:
        server = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        while not (m := re.search(r"listening on 127\.0\.0\.1:(\d+)", log.read_text())):
            assert server.poll() is None, log.read_text()
            time.sleep(0.1)
        code = (
            "from charrnn_keras.serving.client import Client; "
            f"Client('127.0.0.1:{m.group(1)}', timeout=None).generate(['The '] * 64, 10000)"
        )
        client = subprocess.Popen([sys.executable, "-c", code])
        time.sleep(args.wait)
        client.kill()
        client.wait()
        before = cpu_seconds(server.pid)
        time.sleep(5)
        used = cpu_seconds(server.pid) - before
        print(f"server CPU in the 5 s after the client was killed: {used:.2f} s")
    finally:
        server.send_signal(signal.SIGINT)
        server.wait()


if __name__ == "__main__":
    main()
