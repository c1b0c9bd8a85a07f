#!/usr/bin/env python3
"""The side-by-side benchmark (run through scripts/bench-peers.sh, which builds first).

Every server echoes at a path of its own; the same client, target/release/echo-load, drives
all of them. Servers are started by this script and stopped by PID.

With --uws-dir (a folder holding uWebSockets' `uws_echo` server and its `load_test` client,
built as measuring instruments: they are not part of shardgate), uWebSockets joins the
one-core cases as a peer, and `load_test` (C, epoll) drives every server again in the
window-1 cases as a second client that is not ours.
"""
import argparse
import json
import os
import re
import resource
import select
import statistics
import subprocess
import time
from pathlib import Path

import benchlib
from benchlib import free_port

ROOT = Path(__file__).resolve().parent.parent
ECHO_LOAD = ROOT / "target/release/echo-load"
SHARDGATE = ROOT / "target/release/shardgate"
PEER = ROOT / "bench/peers/target/release/peer-echo"
SERVERS = ["shardgate", "tokio-tungstenite", "fastwebsockets", "tokio-websockets"]
PEER_NAME = {"tokio-tungstenite": "tungstenite", "fastwebsockets": "fastwebsockets",
             "tokio-websockets": "tokio-websockets"}
CASES = [(100, 20), (10, 1024), (200, 16384), (500, 16384)]
WINDOWS = [1, 16]
# uWebSockets' load_test prints its rate every 4 s; a run reports 3 intervals after the
# first (a warm-up), over which the server's CPU is also taken.
LOAD_TEST_SECONDS = 17
LOAD_TEST_INTERVAL_S = 4


class Server(benchlib.Server):
    def __init__(self, name, placement, cpus, out, baseline=None, uws_dir=None):
        self.name = name
        port = free_port()
        if name == "uwebsockets":
            # One event loop, pinned as the others pin themselves. SIGPIPE ignored: a write
            # to a connection the client just closed would otherwise end the process.
            cmd = ["sh", "-c", 'trap "" PIPE; exec taskset -c "$0" "$1" "$2"', str(cpus[0]),
                   str(Path(uws_dir) / "uws_echo"), str(port)]
            self.path = "/echo"
        elif name in ("shardgate", "baseline"):
            shards = 1 if placement == "single" else len(cpus)
            binary = SHARDGATE if name == "shardgate" else baseline
            cmd = [str(binary), "serve", "--listen", f"127.0.0.1:{port}", "--shards", str(shards),
                   "--cpus", ",".join(map(str, cpus[:shards])), "--data-dir", str(out),
                   "--max-connections", "19000", "--report-interval", "1h"]
            flags = subprocess.run([str(binary), "serve", "--help"], capture_output=True, text=True).stdout
            if "--echo" in flags:
                cmd.append("--echo")  # builds before --echo served /echo by default
            if "--store" in flags:
                cmd += ["--store", "none"]  # echo needs no message store
            if "--max-connections-per-ip" in flags:
                # The load comes from one address (loopback).
                cmd += ["--max-connections-per-ip", "0", "--handshakes-per-ip", "0"]
            if shards > 1:
                # Each client thread is pinned to a CPU, as a NIC queue would be: its
                # connections go to the shard on that CPU (see kernel-tuning.md).
                cmd.append("--steer-by-cpu")
            self.path = "/echo"
        else:
            threads = 1 if placement == "single" else len(cpus)
            cmd = [str(PEER), "--server", PEER_NAME[name], "--listen", f"127.0.0.1:{port}",
                   "--threads", str(threads), "--cpu", str(cpus[0])]
            self.path = "/"
        super().__init__(cmd, port, out / f"{name}-{placement}.log", f"bench-peers: {name}", timeout=20)


def echo_load(server, args, extra, client_cpus):
    """Runs the client once. Besides its figures, `kv["client_busy"]` is the share of its
    CPUs it kept busy. Where those CPUs are its own (the one-core cases), near 1.0 means
    the client was at its limit: the rate is then the client's as much as the server's."""
    cmd = [str(ECHO_LOAD), "--addr", f"127.0.0.1:{server.port}", "--path", server.path] + extra
    # The servers are children too, but only waited-for children count here: the client.
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((l for l in r.stdout.splitlines() if "failed_connections=" in l), "")
    kv = dict(re.findall(r"(\w+)=([^ ]+)", line))
    if r.returncode != 0 or not kv:
        return None, (r.stdout + r.stderr).strip()[-300:]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    kv["client_busy"] = cpu / (wall * len(client_cpus))
    return kv, None


def load_test(server, conns, size, client_cpu, uws_dir):
    """uWebSockets' load_test against `server` (window 1: each connection sends its next
    message when the echo of the last arrives). Returns the figures echo_load would: msg/s
    (the mean of the intervals after the first), the client's busy share, and the server's
    CPU over those same intervals (`server_cpu_s`, `messages`)."""
    # `stdbuf`: its lines arrive as it prints them (a pipe would hold them to the end).
    # stdbuf and taskset exec it: the PID killed below is load_test's own.
    cmd = ["stdbuf", "-oL", "taskset", "-c", str(client_cpu), str(Path(uws_dir) / "load_test"), str(conns),
           "127.0.0.1", str(server.port), "0", "0", str(size)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    rates, cpu_at_first, pending = [], None, b""
    deadline = started + LOAD_TEST_SECONDS
    try:
        while len(rates) < 3 and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], max(deadline - time.monotonic(), 0))
            if not ready:
                break
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                m = re.search(rb"Msg/sec: ([\d.]+)", line)
                if not m:
                    continue
                if cpu_at_first is None:
                    cpu_at_first = server.cpu_seconds()
                else:
                    rates.append(float(m.group(1)))
        cpu = server.cpu_seconds() - (cpu_at_first or 0)
    finally:
        proc.kill()
        proc.wait()
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if not rates:
        return None, "load_test reported no rate"
    client_cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    rate = statistics.mean(rates)
    return {"msg_per_s": rate, "p50_us": 0, "p99_us": 0, "client_busy": client_cpu_s / wall,
            "server_cpu_s": cpu, "messages": rate * LOAD_TEST_INTERVAL_S * len(rates)}, None


def median_run(runs, key):
    ok = [r for r in runs if r]
    if not ok:
        return None
    ok.sort(key=lambda r: float(r[key]))
    return ok[len(ok) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="one short run per case (about 2 minutes)")
    ap.add_argument("--runs", type=int, default=5, help="rounds per case (each runs every server once)")
    ap.add_argument("--duration", default="3s")
    ap.add_argument("--warmup", default="1s")
    ap.add_argument("--idle-connections", type=int, default=15000)
    ap.add_argument("--results", default=None)
    ap.add_argument("--baseline", metavar="BIN", default=None,
                    help="also run this shardgate binary (built from another commit) as the server 'baseline', "
                         "for a before/after comparison")
    ap.add_argument("--uws-dir", metavar="PATH", default=os.environ.get("UWS_DIR"),
                    help="a folder with uWebSockets' uws_echo and load_test (measuring instruments, not part of "
                         "shardgate): uWebSockets joins the one-core cases, and load_test drives every server in the "
                         "one-core window-1 cases as a second client")
    ap.add_argument("--load-test-runs", type=int, default=3,
                    help=f"rounds of the load_test client per case ({LOAD_TEST_SECONDS} s a run)")
    ap.add_argument("--servers", metavar="LIST", default=None,
                    help="comma-separated servers to run (default: shardgate, the three peers, and 'baseline' "
                         "with --baseline); e.g. --servers shardgate,baseline for an A/B")
    a = ap.parse_args()
    global SERVERS
    if a.baseline:
        SERVERS = SERVERS + ["baseline"]
    uws = a.uws_dir and (Path(a.uws_dir) / "uws_echo").exists()
    load_test_client = a.uws_dir and (Path(a.uws_dir) / "load_test").exists()
    if a.uws_dir and not (uws or load_test_client):
        ap.error(f"--uws-dir {a.uws_dir}: holds neither uws_echo nor load_test")
    if uws:
        SERVERS = SERVERS + ["uwebsockets"]
    if a.servers:
        wanted = a.servers.split(",")
        unknown = [n for n in wanted if n not in SERVERS]
        if unknown or "shardgate" not in wanted:
            ap.error(f"--servers takes shardgate and any of {SERVERS[1:]} (unknown: {unknown})")
        SERVERS = [n for n in SERVERS if n in wanted]
    if a.quick:
        a.runs, a.duration, a.warmup, a.load_test_runs = 1, "1s", "300ms", 1
    out = Path(a.results or ROOT / f"results/peers-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    ncpu = os.cpu_count() or 1
    cpus = list(range(ncpu))
    placements = [("single", [0], [1 % ncpu] if ncpu > 1 else [0]), ("all", cpus, cpus)]
    print(f"host: {ncpu} CPU(s); {a.runs} round(s) of {a.duration} (+{a.warmup} warm-up) per server per case; "
          f"each round runs every server once, in rotating order; medians shown. 'ratio' is the peer's median over "
          f"shardgate's; 'paired' is the median over rounds of the peer's figure over shardgate's in the same round "
          f"(drift of the machine between rounds cancels out); 'sg ahead' counts the rounds shardgate won; 'client' "
          f"is the share of its CPUs the client kept busy (one core: a core of its own; all cores: shared with the server)")
    rows = []  # raw: one per run

    def record(placement, case, server, run, kv, cpu_s, rss_kib, error, messages=None):
        rate = (float(kv["msg_per_s"]) if kv and "msg_per_s" in kv else
                (float(kv["handshakes_per_s"]) if kv and "handshakes_per_s" in kv else 0.0))
        if messages is None:
            # echo-load's CPU window is the whole run, warm-up included.
            messages = rate * (parse_seconds(a.duration) + parse_seconds(a.warmup))
        rows.append({"placement": placement, "case": case, "server": server, "run": run, "msg_per_s": rate,
                     "p50_us": int(kv["p50_us"]) if kv else 0, "p99_us": int(kv["p99_us"]) if kv else 0,
                     "server_cpu_s": round(cpu_s, 3),
                     "server_us_per_msg": round(cpu_s * 1e6 / messages, 3) if messages else 0.0,
                     "server_peak_rss_kib": rss_kib,
                     "client_busy": round(kv["client_busy"], 3) if kv else 0.0, "error": error or ""})

    for placement, server_cpus, client_cpus in placements:
        if placement == "single":
            where = f"servers on CPU {server_cpus[0]} (shardgate --shards 1; peers on a current-thread runtime), client on CPU {client_cpus[0]}"
        else:
            where = (f"servers on all {ncpu} CPUs (shardgate --shards {ncpu} --steer-by-cpu; peers on a {ncpu}-worker runtime), "
                     f"client on the same CPUs {client_cpus} (a {ncpu}-CPU host has no core to spare)")
        print(f"\n=== {placement} core{'s' if placement == 'all' else ''}: {where}")
        names = [n for n in SERVERS if not (n == "uwebsockets" and placement == "all")]
        servers = {n: Server(n, placement, server_cpus, out, a.baseline, a.uws_dir) for n in names}
        try:
            client = ["--cpus", ",".join(map(str, client_cpus)), "-d", a.duration, "--warmup", a.warmup]
            cases = [(c, s, w) for w in WINDOWS for (c, s) in CASES] + [("handshakes", 20, 1)]
            for c, size, window in cases:
                name = f"{c}x{size}B w{window}" if c != "handshakes" else "handshakes (upgrade + 1 echo + close), 50 at a time"
                for run in range(a.runs):
                    # Each round starts one server later, so that no server always runs
                    # first (right after the previous case) or last.
                    for n in names[run % len(names):] + names[:run % len(names)]:
                        s = servers[n]
                        before = s.cpu_seconds()
                        if c == "handshakes":
                            kv, err = echo_load(s, a, client + ["--handshakes", "-c", "50", "-s", str(size)], client_cpus)
                        else:
                            kv, err = echo_load(s, a, client + ["-c", str(c), "-s", str(size), "-w", str(window)],
                                                client_cpus)
                        record(placement, name, n, run, kv, s.cpu_seconds() - before, s.status_kib("VmHWM"), err)
                print_table(placement, name, rows, "handshakes/s" if c == "handshakes" else "msg/s")
                if load_test_client and placement == "single" and window == 1 and c != "handshakes":
                    lt_name = f"{name} (client: uWebSockets load_test)"
                    for run in range(a.load_test_runs):
                        for n in names[run % len(names):] + names[:run % len(names)]:
                            s = servers[n]
                            kv, err = load_test(s, c, size, client_cpus[0], a.uws_dir)
                            record(placement, lt_name, n, run, kv, kv["server_cpu_s"] if kv else 0.0,
                                   s.status_kib("VmHWM"), err, kv["messages"] if kv else None)
                    print_table(placement, lt_name, rows, "msg/s")
            if placement == "single":
                idle_memory(servers, a, out, rows, client_cpus)
        finally:
            for s in servers.values():
                s.stop()

    with open(out / "raw.csv", "w") as f:
        keys = list(rows[0].keys())
        f.write(",".join(keys) + "\n")
        for r in rows:
            f.write(",".join(str(r[k]).replace(",", ";") for k in keys) + "\n")
    summary = summarize(rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    chart(summary, out / "chart.svg")
    # Behind: the peer was faster in the same round more often than not.
    # With the client's busy share: where it is near 100% on a core of its own, the client
    # bounded the rate for every server alike.
    losses = [(s["placement"], s["case"], p, v["paired_ratio"],
               s["servers"].get("shardgate", {}).get("client_busy", 0.0))
              for s in summary for p, v in s["servers"].items()
              if p != "shardgate" and s["metric"] != "bytes/conn" and (v.get("paired_ratio") or 0) > 1.0]
    print(f"\nresults: {out} (raw.csv, summary.json, chart.svg)")
    if losses:
        print("shardgate is behind in: " + "; ".join(f"{pl}/{c} ({p}, paired {r:.3f}; client {busy:.0%} busy)"
                                                       for pl, c, p, r, busy in losses))
    else:
        print("shardgate is at or above every peer in every throughput case")


def idle_memory(servers, a, out, rows, client_cpus):
    n = a.idle_connections
    print(f"\n--- idle memory: {n} upgraded, idle connections per server (RSS growth / connections)")
    print(f"{'server':20s} {'bytes/conn':>10s} {'RSS before':>12s} {'RSS held':>10s}")
    for name, s in servers.items():
        before = s.status_kib("VmRSS")
        log = open(out / f"idle-{name}.log", "w")
        proc = subprocess.Popen([str(ECHO_LOAD), "--addr", f"127.0.0.1:{s.port}", "--path", s.path, "--idle",
                                 "-c", str(n), "--cpus", ",".join(map(str, client_cpus)), "-d", "3s"],
                                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        up = 0
        while time.time() < deadline and proc.poll() is None:
            text = (out / f"idle-{name}.log").read_text()
            up = sum(int(m) for m in re.findall(r"echo-load: (\d+) connections up", text))
            if len(re.findall(r"connections up", text)) >= len(client_cpus):
                break
            time.sleep(0.1)
        held = s.status_kib("VmRSS")
        proc.wait(timeout=60)
        log.close()
        per = (held - before) * 1024 / max(up, 1)
        rows.append({"placement": "single", "case": f"idle memory, {n} connections", "server": name, "run": 0,
                     "msg_per_s": round(per), "p50_us": 0, "p99_us": 0, "server_cpu_s": 0, "server_us_per_msg": 0,
                     "server_peak_rss_kib": held, "client_busy": 0.0, "error": "" if up == n else f"only {up} up"})
        print(f"{name:20s} {per:10.0f} {before:9d} KiB {held:7d} KiB" + ("" if up == n else f"  (only {up} up)"))
        time.sleep(0.5)


def parse_seconds(d):
    """'3s', '300ms', '1m' → seconds."""
    m = re.fullmatch(r"([\d.]+)(ms|s|m)", d)
    if not m:
        raise SystemExit(f"a duration like 3s or 300ms, not {d!r}")
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60}[m.group(2)]


def paired(rows, peer):
    """Per-round ratios peer / shardgate (rounds where both ran): their median, and in how
    many of them shardgate was at least as fast. For memory the figures are bytes, and the
    ratio reads the other way round (above 1: the peer uses more)."""
    by_run = {}
    for r in rows:
        if not r["error"]:
            by_run.setdefault(r["run"], {})[r["server"]] = r["msg_per_s"]
    ratios = [v[peer] / v["shardgate"] for v in by_run.values() if v.get("shardgate") and peer in v]
    if not ratios:
        return None, 0, 0
    return statistics.median(ratios), sum(1 for x in ratios if x <= 1.0), len(ratios)


def print_table(placement, name, rows, unit):
    mine = [r for r in rows if r["placement"] == placement and r["case"] == name]
    print(f"\n--- {name}")
    print(f"{'server':20s} {unit:>12s} {'ratio':>7s} {'paired':>7s} {'sg ahead':>9s} {'p50_us':>8s} {'p99_us':>8s} "
          f"{'cpu_s':>7s} {'us/msg':>7s} {'peak_rss':>10s} {'client':>7s}")
    base = statistics.median([r["msg_per_s"] for r in mine if r["server"] == "shardgate"] or [0])
    for n in SERVERS:
        rs = [r for r in mine if r["server"] == n]
        ok = [r for r in rs if not r["error"]]
        if not rs:
            continue
        if not ok:
            print(f"{n:20s} {'failed':>12s}   {rs[0]['error'] if rs else ''}")
            continue
        ok.sort(key=lambda r: r["msg_per_s"])
        m = ok[len(ok) // 2]
        ratio = m["msg_per_s"] / base if base else 0
        pr, won, rounds = paired(mine, n) if n != "shardgate" else (1.0, 0, 0)
        ahead = f"{won}/{rounds}" if n != "shardgate" else ""
        busy = statistics.median(r['client_busy'] for r in ok)
        # A client above 90% of its core bounds the rate for every server alike.
        print(f"{n:20s} {m['msg_per_s']:12.0f} {ratio:7.2f} {pr or 0:7.2f} {ahead:>9s} {m['p50_us']:8d} {m['p99_us']:8d} "
              f"{statistics.median(r['server_cpu_s'] for r in ok):7.2f} "
              f"{statistics.median(r['server_us_per_msg'] for r in ok):7.2f} {m['server_peak_rss_kib'] / 1024:7.1f} MiB "
              f"{busy:6.0%}" + ("  client-bound" if busy > 0.9 and placement == "single" else ""))


def summarize(rows):
    out = []
    for key in dict.fromkeys((r["placement"], r["case"]) for r in rows):
        mine = [r for r in rows if (r["placement"], r["case"]) == key and not r["error"]]
        metric = "bytes/conn" if key[1].startswith("idle") else ("handshakes/s" if key[1].startswith("handshakes") else "msg/s")
        med = {}
        for n in SERVERS:
            vals = sorted(r["msg_per_s"] for r in mine if r["server"] == n)
            if vals:
                med[n] = vals[len(vals) // 2]
        base = med.get("shardgate")
        servers = {}
        for n, v in med.items():
            ratio = None
            if base:
                # For memory, smaller is better: the ratio says how much a peer uses per shardgate byte.
                ratio = round(v / base, 3)
            entry = {"median": v, "ratio_to_shardgate": ratio}
            if metric != "bytes/conn":
                entry["client_busy"] = statistics.median(r["client_busy"] for r in mine if r["server"] == n)
                entry["server_us_per_msg"] = statistics.median(r["server_us_per_msg"] for r in mine if r["server"] == n)
            if n != "shardgate" and metric != "bytes/conn":
                pr, won, rounds = paired(mine, n)
                entry["paired_ratio"] = round(pr, 3) if pr is not None else None
                entry["rounds_shardgate_ahead"] = won
                entry["rounds"] = rounds
            servers[n] = entry
        out.append({"placement": key[0], "case": key[1], "metric": metric, "servers": servers})
    return out


def chart(summary, path):
    """Bars: each peer's median relative to shardgate (1.0 = equal), one group per case."""
    colors = {"shardgate": "#1f77b4", "tokio-tungstenite": "#ff7f0e", "fastwebsockets": "#2ca02c",
              "tokio-websockets": "#d62728", "baseline": "#7f7f7f", "uwebsockets": "#9467bd"}
    groups = [s for s in summary if s["metric"] != "bytes/conn"]
    w, h, pad, bar = 60 + 70 * len(groups), 360, 50, 14
    top = max([v["ratio_to_shardgate"] or 0 for s in groups for v in s["servers"].values()] + [1.2])
    y = lambda r: h - pad - (h - 2 * pad) * r / top
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h + 120}" font-family="sans-serif" font-size="10">',
           f'<text x="{pad}" y="16" font-size="13">throughput relative to shardgate (1.0 = shardgate; higher is faster)</text>',
           f'<line x1="{pad}" x2="{w - 10}" y1="{y(1):.1f}" y2="{y(1):.1f}" stroke="#888" stroke-dasharray="4"/>']
    for gi, s in enumerate(groups):
        x0 = pad + gi * 70
        for si, n in enumerate(SERVERS):
            r = (s["servers"].get(n) or {}).get("ratio_to_shardgate") or 0
            svg.append(f'<rect x="{x0 + si * bar}" y="{y(r):.1f}" width="{bar - 2}" height="{y(0) - y(r):.1f}" fill="{colors[n]}"/>')
        label = f'{s["placement"]}: {s["case"].split(",")[0]}'
        svg.append(f'<text transform="translate({x0 + 20},{h - pad + 10}) rotate(60)">{label}</text>')
    for si, n in enumerate(SERVERS):
        svg.append(f'<rect x="{pad + si * 150}" y="24" width="10" height="10" fill="{colors[n]}"/><text x="{pad + si * 150 + 14}" y="33">{n}</text>')
    svg.append("</svg>")
    path.write_text("\n".join(svg) + "\n")


if __name__ == "__main__":
    main()
