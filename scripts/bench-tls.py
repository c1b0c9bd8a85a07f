#!/usr/bin/env python3
"""What wss:// costs beside ws://, on one gateway (run through scripts/bench-tls.sh, which
builds first and makes the certificate).

One gateway, `--shards 1` on CPU 0, listening plain (`--listen`) and TLS (`--listen-tls`)
at once; echo-load on CPU 1 against each port in turn. Each round runs every case on both
ports, alternating which goes first, so a pair sees the same machine; the tables show
medians over the rounds and the paired ratio (TLS / plain, per round, median). Server CPU
per message (or handshake) from /proc/PID/stat over the run; the client's own CPU shown,
and a case where it was over 90% busy marked client-bound. Then the idle memory: a fresh
gateway (2 shards), 15,000 connections held (plain, then TLS), RSS after minus before.
"""
import argparse
import re
import statistics
import subprocess
import time
from pathlib import Path

import benchlib
from benchlib import free_port

ROOT = Path(__file__).resolve().parent.parent
ECHO_LOAD = ROOT / "target/release/echo-load"
GATEWAY = ROOT / "target/release/shardgate"
ECHO_CASES = [(100, 20, 1), (200, 16384, 1), (100, 20, 16), (200, 16384, 16)]
HANDSHAKE_CASES = [("plain", []), ("TLS full", ["--tls"]), ("TLS resumed", ["--tls", "--tls-resume"])]


class Gateway(benchlib.Server):
    def __init__(self, out, name, certs, shards=1, binary=GATEWAY):
        port, tls_port = free_port(), free_port()
        cpus = ["--cpus", "0"] if shards == 1 else []
        cmd = [str(binary), "serve", "--listen", f"127.0.0.1:{port}", "--shards", str(shards), *cpus, "--echo",
               "--listen-tls", f"127.0.0.1:{tls_port}", "--tls-cert", str(certs / "cert.pem"),
               "--tls-key", str(certs / "key.pem"), "--max-message-size", "1048576",
               "--store", "none", "--data-dir", str(out), "--report-interval", "1h",
               "--max-connections-per-ip", "0", "--handshakes-per-ip", "0"]
        super().__init__(cmd, port, out / f"{name}.log", f"bench-tls: {name}")
        self.tls_port = tls_port


def run(gw, args, duration, what):
    tls = "--tls" in args
    port = gw.tls_port if tls else gw.port
    cmd = [str(ECHO_LOAD), "--addr", f"127.0.0.1:{port}", "-d", duration, "--cpus", "1", *args]
    kv, wall, server_cpu, client_busy = benchlib.echo_load(gw, cmd, what)
    rate = float(kv.get("msg_per_s") or kv["handshakes_per_s"])
    return {"rate": rate, "server_us": server_cpu * 1e6 / max(rate * wall, 1), "client_busy": client_busy,
            "p99_us": float(kv["p99_us"])}


def table(title, header, rows, runs, sides):
    med = statistics.median
    lines = [title, "", header, "|" + "---|" + "---:|" * (header.count("|") - 2)]
    for key, label in rows:
        base = runs[(key, sides[0])]
        cells = []
        for side in sides:
            r = runs[(key, side)]
            cells.append(f"{med(x['rate'] for x in r):,.0f}")
        for side in sides[1:]:
            cells.append(f"{med(x['rate'] / y['rate'] for x, y in zip(runs[(key, side)], base)):.2f}")
        for side in sides:
            cells.append(f"{med(x['server_us'] for x in runs[(key, side)]):.2f}")
        busy = max(med(x["client_busy"] for x in runs[(key, side)]) for side in sides)
        cells.append(f"{busy * 100:.0f}%" + (" (client-bound)" if busy > 0.9 else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def idle_memory(out, certs, n, hold, binary):
    """Bytes of server RSS per idle upgraded connection, plain and TLS, each on a fresh
    gateway."""
    result = {}
    for side, args in (("plain", []), ("TLS", ["--tls"])):
        gw = Gateway(out, f"idle-{side}", certs, shards=2, binary=binary)
        try:
            time.sleep(0.5)
            before = gw.status_kib("VmRSS")
            port = gw.tls_port if args else gw.port
            log = open(out / f"idle-{side}-client.log", "w")
            client = subprocess.Popen([str(ECHO_LOAD), "--addr", f"127.0.0.1:{port}", "--idle", "-c", str(n),
                                       "--cpus", "0,1", "-d", hold, *args], stdout=log, stderr=subprocess.STDOUT)
            up = 0
            deadline = time.time() + 120
            while time.time() < deadline and client.poll() is None:
                text = (out / f"idle-{side}-client.log").read_text()
                ups = [int(x) for x in re.findall(r"echo-load: (\d+) connections up", text)]
                if len(ups) == 2:
                    up = sum(ups)
                    break
                time.sleep(0.2)
            after = gw.status_kib("VmRSS")
            client.wait(timeout=300)
            log.close()
            if up != n:
                raise SystemExit(f"bench-tls: idle {side}: {up} of {n} connections came up; see {log.name}")
            result[side] = (after - before) * 1024 / n
        finally:
            gw.stop()
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--certs", required=True, help="directory holding cert.pem and key.pem")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", default="5s")
    ap.add_argument("--idle", type=int, default=15000, help="connections held for the idle memory (0: skip)")
    ap.add_argument("--results", default=str(ROOT / "results/bench-tls"))
    ap.add_argument("--gateway", default=str(GATEWAY), help="the shardgate binary to measure (another build, for an A/B)")
    args = ap.parse_args()
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    certs = Path(args.certs)
    runs = {}
    for r in range(args.rounds):
        gw = Gateway(out, f"gateway-r{r}", certs, binary=args.gateway)
        try:
            for conns, size, window in ECHO_CASES:
                sides = ("plain", "TLS") if r % 2 == 0 else ("TLS", "plain")
                for side in sides:
                    extra = ["--tls"] if side == "TLS" else []
                    load = ["-c", str(conns), "-s", str(size), "-w", str(window), *extra]
                    runs.setdefault(((conns, size, window), side), []).append(
                        run(gw, load, args.duration, f"{side} {conns}x{size} w{window}"))
                print(f"round {r + 1}/{args.rounds} {conns}x{size} w{window}: " + ", ".join(
                    f"{side} {runs[((conns, size, window), side)][-1]['rate']:,.0f}" for side in ("plain", "TLS")), flush=True)
            order = HANDSHAKE_CASES if r % 2 == 0 else list(reversed(HANDSHAKE_CASES))
            for side, extra in order:
                runs.setdefault(("handshakes", side), []).append(
                    run(gw, ["--handshakes", "-c", "50", *extra], args.duration, f"handshakes {side}"))
            print(f"round {r + 1}/{args.rounds} handshakes: " + ", ".join(
                f"{side} {runs[('handshakes', side)][-1]['rate']:,.0f}" for side, _ in HANDSHAKE_CASES), flush=True)
        finally:
            gw.stop()
    echo = table(
        f"echo, server on CPU 0 (one shard), echo-load on CPU 1; {args.rounds} rounds of {args.duration}, medians",
        "| case | plain msg/s | TLS msg/s | TLS / plain (paired) | plain µs/msg | TLS µs/msg | client CPU |",
        [((c, s, w), f"{c}×{s} B, window {w}") for c, s, w in ECHO_CASES], runs, ("plain", "TLS"))
    hs = table(
        "handshakes: 50 concurrent loops of connect, (TLS handshake,) upgrade, one 20 B echo, close",
        "| case | plain /s | TLS full /s | TLS resumed /s | full / plain | resumed / plain | plain µs | full µs | resumed µs | client CPU |",
        [("handshakes", "per second, one shard")], runs, ("plain", "TLS full", "TLS resumed"))
    text = echo + "\n\n" + hs
    if args.idle:
        mem = idle_memory(out, certs, args.idle, "15s", args.gateway)
        text += (f"\n\nidle memory, {args.idle:,} upgraded connections on 2 shards (server RSS after − before, per connection): "
                 f"plain {mem['plain']:,.0f} B, TLS {mem['TLS']:,.0f} B")
    print(text)
    (out / "tls.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
