"""What the benchmark drivers (bench-peers.py, bench-deflate.py, bench-metrics.py) share:
a free loopback port, a server process started and stopped by PID, and a process's CPU
time and memory from /proc."""
import os
import re
import resource
import signal
import socket
import subprocess
import time


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def cpu_seconds(pid):
    """utime + stime of every thread of `pid`, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status_kib(pid, key):
    """A `kB` field of /proc/PID/status (VmRSS, VmHWM, …); 0 if absent."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


class Server:
    """`cmd`, a server listening on 127.0.0.1:`port`, its output in `log_path`: started,
    waited for until it accepts connections (`what` names it if it does not), stopped by
    PID (SIGTERM, then SIGKILL)."""

    def __init__(self, cmd, port, log_path, what, timeout=30):
        self.port = port
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
        raise SystemExit(f"{what} did not start; see {self.log.name}")

    def cpu_seconds(self):
        return cpu_seconds(self.proc.pid)

    def status_kib(self, key):
        return status_kib(self.proc.pid, key)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def echo_load(server, cmd, what):
    """Runs echo-load (`cmd`, an echo or a `--handshakes` run) against `server` once.
    Returns its `key=value` summary, the
    wall time, the server's CPU seconds over the run, and the share of a CPU the client
    kept busy."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_before = server.cpu_seconds()
    started = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    wall = time.monotonic() - started
    server_cpu = server.cpu_seconds() - cpu_before
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    summary = (l for l in r.stdout.splitlines() if "msg_per_s=" in l or "handshakes_per_s=" in l)
    kv = dict(re.findall(r"(\w+)=([^ ]+)", next(summary, "")))
    if r.returncode != 0 or not kv:
        raise SystemExit(f"{what}: echo-load failed: {(r.stdout + r.stderr)[-400:]}")
    client_busy = ((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)) / wall
    return kv, wall, server_cpu, client_busy
