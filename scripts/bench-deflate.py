#!/usr/bin/env python3
"""What permessage-deflate costs and saves (run through scripts/bench-deflate.sh, which
builds first).

One shardgate (`--shards 1 --deflate`, CPU 0) and echo-load on CPU 1, JSON-like chat
payloads, window 1. Each round runs every case plain and compressed, alternating, so the
two sides of a pair see the same machine; the table shows medians over the rounds and
the paired ratio (compressed / plain, per round, median). Server CPU per message comes
from /proc/PID/stat over the run; the client's own CPU is shown, and a case where it was
over 90% busy is marked client-bound. Then idle memory: 15,000 upgraded connections with
and without the extension, each on a fresh gateway; and what context takeover holds:
2,000 connections that each echoed one compressed message, with and without
--deflate-context-takeover.
"""
import argparse
import re
import socket
import statistics
import struct
import subprocess
import time
import zlib
from pathlib import Path

import benchlib
from benchlib import free_port

ROOT = Path(__file__).resolve().parent.parent
ECHO_LOAD = ROOT / "target/release/echo-load"
SHARDGATE = ROOT / "target/release/shardgate"
FANOUT = ROOT / "target/release/deflate-fanout"
CASES = [(10, 1024), (200, 16384)]


class Gateway(benchlib.Server):
    def __init__(self, out, name, extra=()):
        port = free_port()
        cmd = [str(SHARDGATE), "serve", "--listen", f"127.0.0.1:{port}", "--shards", "1", "--cpus", "0",
               "--echo", "--deflate", "--store", "none", "--data-dir", str(out), "--report-interval", "1h",
               "--max-connections-per-ip", "0", "--handshakes-per-ip", "0", "--max-connections", "19000",
               *extra]
        super().__init__(cmd, port, out / f"{name}.log", "bench-deflate: the gateway")

    def rss_kib(self):
        return self.status_kib("VmRSS")


def echo_run(gw, conns, size, deflate, duration):
    cmd = [str(ECHO_LOAD), "--addr", f"127.0.0.1:{gw.port}", "-c", str(conns), "-s", str(size), "-w", "1",
           "-d", duration, "--cpus", "1", "--payload", "json"] + (["--deflate"] if deflate else [])
    kv, wall, server_cpu, client_busy = benchlib.echo_load(gw, cmd, "bench-deflate")
    msgs = float(kv["messages"])
    # The server's CPU over the whole run (warm-up included) per message of the measured
    # window would overstate it; scale the messages to the wall time instead.
    rate = float(kv["msg_per_s"])
    return {
        "msg_per_s": rate,
        "p99_us": int(kv["p99_us"]),
        "server_us_per_msg": server_cpu * 1e6 / max(rate * wall, 1),
        "client_busy": client_busy,
        "echo_bytes_per_msg": float(kv["echo_bytes_per_msg"]),
        "messages": msgs,
    }


def idle_bytes(out, n, deflate, name):
    gw = Gateway(out, name)
    try:
        before = gw.rss_kib()
        log_path = out / f"{name}-client.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen([str(ECHO_LOAD), "--addr", f"127.0.0.1:{gw.port}", "--idle", "-c", str(n),
                                     "--cpus", "0,1", "-d", "5s"] + (["--deflate"] if deflate else []),
                                    stdout=log, stderr=subprocess.STDOUT)
            deadline = time.time() + 120
            up = 0
            while time.time() < deadline and proc.poll() is None:
                text = log_path.read_text()
                if len(re.findall(r"connections up", text)) >= 2:
                    up = sum(int(m) for m in re.findall(r"echo-load: (\d+) connections up", text))
                    break
                time.sleep(0.1)
            held = gw.rss_kib()
            proc.wait(timeout=60)
        if up != n:
            raise SystemExit(f"bench-deflate: only {up} of {n} idle connections came up; see {log_path}")
        return (held - before) * 1024 / n
    finally:
        gw.stop()


def one_compressed_echo(port, message):
    """Upgrades offering permessage-deflate with context kept on both sides (what
    browsers offer), echoes one compressed message, and returns the open socket."""
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
              b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(4096)
    assert head.startswith(b"HTTP/1.1 101") and b"permessage-deflate" in head, head
    c = zlib.compressobj(1, zlib.DEFLATED, -15)
    deflated = (c.compress(message) + c.flush(zlib.Z_SYNC_FLUSH))[:-4]
    mask = b"\x01\x02\x03\x04"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(deflated))
    s.sendall(bytes([0xC1, 0x80 | 126]) + struct.pack(">H", len(deflated)) + mask + masked)
    rest = head.split(b"\r\n\r\n", 1)[1]
    while len(rest) < 4:
        rest += s.recv(4096)
    length = rest[1] & 0x7F
    need = 2 + (2 if length == 126 else 0) + (struct.unpack(">H", rest[2:4])[0] if length == 126 else length)
    while len(rest) < need:
        rest += s.recv(65536)
    return s


def takeover_bytes(out, n, takeover, name):
    extra = ["--deflate-context-takeover"] if takeover else []
    gw = Gateway(out, name, extra)
    message = ('{"type":"msg","body":{"text":"' + "see you at the meeting tomorrow " * 60 + '"}}').encode()
    try:
        before = gw.rss_kib()
        socks = [one_compressed_echo(gw.port, message) for _ in range(n)]
        held = gw.rss_kib()
        for s in socks:
            s.close()
        return (held - before) * 1024 / n
    finally:
        gw.stop()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", default="4s")
    p.add_argument("--idle-connections", type=int, default=15000)
    a = p.parse_args()
    out = ROOT / "target/bench-deflate"
    out.mkdir(parents=True, exist_ok=True)

    print(f"echo, window 1, JSON-like payloads: shardgate --shards 1 --deflate on CPU 0, echo-load on CPU 1; "
          f"{a.rounds} rounds of {a.duration}, plain and compressed alternating; medians")
    gw = Gateway(out, "echo")
    runs = {}
    try:
        for _ in range(a.rounds):
            for conns, size in CASES:
                for deflate in (False, True):
                    runs.setdefault((conns, size, deflate), []).append(echo_run(gw, conns, size, deflate, a.duration))
    finally:
        gw.stop()
    print(f"{'case':14s} {'':10s} {'msg/s':>9s} {'ratio':>6s} {'p99 us':>7s} {'server us/msg':>13s} "
          f"{'ratio':>6s} {'echo bytes/msg':>14s} {'client busy':>11s}")
    for conns, size in CASES:
        plain, packed = runs[(conns, size, False)], runs[(conns, size, True)]
        for label, rs in (("plain", plain), ("deflate", packed)):
            med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
            ratio_rate = statistics.median(p["msg_per_s"] / q["msg_per_s"] for p, q in zip(packed, plain))
            ratio_cpu = statistics.median(p["server_us_per_msg"] / q["server_us_per_msg"] for p, q in zip(packed, plain))
            bound = " client-bound" if med["client_busy"] > 0.9 else ""
            print(f"{conns}x{size}B{'':4s} {label:10s} {med['msg_per_s']:9.0f} "
                  f"{(ratio_rate if label == 'deflate' else 1.0):6.2f} {med['p99_us']:7.0f} "
                  f"{med['server_us_per_msg']:13.2f} {(ratio_cpu if label == 'deflate' else 1.0):6.2f} "
                  f"{med['echo_bytes_per_msg']:14.0f} {med['client_busy'] * 100:10.0f}%{bound}")

    n = a.idle_connections
    print(f"\nidle memory: {n} upgraded connections, a fresh gateway each, RSS growth / connections")
    plain = [idle_bytes(out, n, False, f"idle-plain-{i}") for i in range(a.rounds)]
    packed = [idle_bytes(out, n, True, f"idle-deflate-{i}") for i in range(a.rounds)]
    print(f"without the extension: {statistics.median(plain):.0f} B/conn (rounds: {', '.join(f'{x:.0f}' for x in plain)})")
    print(f"with it negotiated:    {statistics.median(packed):.0f} B/conn (rounds: {', '.join(f'{x:.0f}' for x in packed)})")

    m = 2000
    print(f"\ncontext takeover: {m} connections that each echoed one compressed 2 KiB message, RSS growth / connections")
    without = [takeover_bytes(out, m, False, f"takeover-off-{i}") for i in range(a.rounds)]
    with_ = [takeover_bytes(out, m, True, f"takeover-on-{i}") for i in range(a.rounds)]
    print(f"no context kept (default):     {statistics.median(without):.0f} B/conn "
          f"(rounds: {', '.join(f'{x:.0f}' for x in without)})")
    print(f"--deflate-context-takeover:    {statistics.median(with_):.0f} B/conn "
          f"(rounds: {', '.join(f'{x:.0f}' for x in with_)})")

    print("\nroom fan-out, the compression step (target/release/deflate-fanout):")
    r = subprocess.run([str(FANOUT)], capture_output=True, text=True, timeout=300)
    print(r.stdout.strip())


if __name__ == "__main__":
    main()
