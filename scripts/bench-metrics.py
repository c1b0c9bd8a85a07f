#!/usr/bin/env python3
"""What the metrics cost on the echo path (run through scripts/bench-metrics.sh, which
builds both binaries first).

Two gateways side by side, each `--shards 1` on CPU 0 with echo-load on CPU 1, window 1:
the build before the counters and the board existed (`--baseline BIN`), and the current
build while a scraper GETs /metrics once a second (15 times Prometheus' default rate).
Each round runs every case on both, alternating, so a pair sees the same machine; the
table shows medians over the rounds and the paired ratio (current / baseline, per round,
median). Server CPU per message from /proc/PID/stat over the run; the client's own CPU
shown, and a case where it was over 90% busy marked client-bound.
"""
import argparse
import statistics
import threading
import urllib.request
from pathlib import Path

import benchlib
from benchlib import free_port

ROOT = Path(__file__).resolve().parent.parent
ECHO_LOAD = ROOT / "target/release/echo-load"
CURRENT = ROOT / "target/release/shardgate"
CASES = [(100, 20), (10, 1024), (200, 16384)]


class Gateway(benchlib.Server):
    def __init__(self, binary, out, name):
        port = free_port()
        cmd = [str(binary), "serve", "--listen", f"127.0.0.1:{port}", "--shards", "1", "--cpus", "0", "--echo",
               "--store", "none", "--data-dir", str(out), "--report-interval", "1h",
               "--max-connections-per-ip", "0", "--handshakes-per-ip", "0"]
        super().__init__(cmd, port, out / f"{name}.log", f"bench-metrics: {name}")


class Scraper(threading.Thread):
    """GETs /metrics once a second until stopped; counts what it got."""

    def __init__(self, port):
        super().__init__(daemon=True)
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.done = threading.Event()
        self.scrapes = 0

    def run(self):
        while not self.done.wait(1.0):
            body = urllib.request.urlopen(self.url, timeout=5).read()
            if b"shardgate_frames_in_total" in body:
                self.scrapes += 1


def echo_run(gw, conns, size, duration):
    cmd = [str(ECHO_LOAD), "--addr", f"127.0.0.1:{gw.port}", "-c", str(conns), "-s", str(size), "-w", "1",
           "-d", duration, "--cpus", "1"]
    kv, wall, server_cpu, client_busy = benchlib.echo_load(gw, cmd, "bench-metrics")
    rate = float(kv["msg_per_s"])
    return {
        "msg_per_s": rate,
        "server_us_per_msg": server_cpu * 1e6 / max(rate * wall, 1),
        "client_busy": client_busy,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", required=True, help="the gateway binary built before the metrics")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", default="5s")
    ap.add_argument("--results", default=str(ROOT / "results/bench-metrics"))
    args = ap.parse_args()
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    runs = {(c, s, side): [] for c, s in CASES for side in ("baseline", "metrics")}
    scrapes = 0
    for r in range(args.rounds):
        for conns, size in CASES:
            for side in (("baseline", "metrics") if r % 2 == 0 else ("metrics", "baseline")):
                binary = args.baseline if side == "baseline" else CURRENT
                gw = Gateway(binary, out, f"{side}-{conns}x{size}-r{r}")
                scraper = None
                try:
                    if side == "metrics":
                        scraper = Scraper(gw.port)
                        scraper.start()
                    runs[(conns, size, side)].append(echo_run(gw, conns, size, args.duration))
                finally:
                    if scraper:
                        scraper.done.set()
                        scraper.join()
                        scrapes += scraper.scrapes
                    gw.stop()
            print(f"round {r + 1}/{args.rounds} {conns}x{size}: "
                  + ", ".join(f"{side} {runs[(conns, size, side)][-1]['msg_per_s']:,.0f}" for side in ("baseline", "metrics")),
                  flush=True)
    med = statistics.median
    lines = [
        f"echo, window 1, server on CPU 0, echo-load on CPU 1; {args.rounds} rounds of {args.duration}; "
        f"metrics side scraped once a second ({scrapes} scrapes)",
        "",
        "| case | baseline msg/s | with metrics msg/s | paired ratio | baseline µs/msg | with metrics µs/msg | client CPU |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for conns, size in CASES:
        b, m = runs[(conns, size, "baseline")], runs[(conns, size, "metrics")]
        ratio = med(x["msg_per_s"] / y["msg_per_s"] for x, y in zip(m, b))
        busy = max(med(x["client_busy"] for x in b), med(x["client_busy"] for x in m))
        mark = " (client-bound)" if busy > 0.9 else ""
        lines.append(
            f"| {conns}×{size} B | {med(x['msg_per_s'] for x in b):,.0f} | {med(x['msg_per_s'] for x in m):,.0f} | "
            f"{ratio:.3f} | {med(x['server_us_per_msg'] for x in b):.2f} | {med(x['server_us_per_msg'] for x in m):.2f} | "
            f"{busy * 100:.0f}%{mark} |"
        )
    text = "\n".join(lines)
    print(text)
    (out / "echo.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
