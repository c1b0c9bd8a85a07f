#!/usr/bin/env python3
"""Summarises a soak run's results folder: summary.txt, summary.json and latency.svg.

Reads the load generator's log (progress lines, summary line, client latency distribution),
each gateway's log (report lines, its whole-run distribution) and the per-shard CPU samples.
Exits 1 unless the run passed.
"""
import argparse
import json
import math
import pathlib
import re
import sys

KV = re.compile(r"(\w+)=([^ ]+)")


def kv(line):
    return {k: v for k, v in KV.findall(line)}


def distribution(lines):
    """Rows (value_ms, percentile) of an HdrHistogram percentile table."""
    rows = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 3 and not line.startswith("#"):
            try:
                rows.append((float(parts[0]), float(parts[1])))
            except ValueError:
                pass
    return rows


def at(rows, q):
    for value, p in rows:
        if p >= q:
            return value
    return rows[-1][0] if rows else 0.0


def polyline(points, colour, sx, sy):
    path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
    return f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{path}"/>'


def chart(progress, server_series, client_rows, server_rows, slo_ms, path):
    w, h, pad = 900, 300, 50
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{2 * h + 40}" font-family="sans-serif" font-size="11">',
           '<rect width="100%" height="100%" fill="white"/>']

    def log_axis(lo, hi, y0):
        lo, hi = math.log10(max(lo, 0.01)), math.log10(max(hi, lo * 10))
        return lambda v: y0 + h - pad - (math.log10(max(v, 0.01)) - lo) / (hi - lo) * (h - 2 * pad), lo, hi

    # 1: latency percentiles over time.
    t_max = max([p[0] for p in progress] + [p[0] for p in server_series] + [1])
    values = [v for _, a, b, c in progress for v in (a, b, c)] + [v for _, v in server_series] + [slo_ms]
    sy, lo, hi = log_axis(min([v for v in values if v > 0] + [0.05]), max(values), 0)
    sx = lambda t: pad + t / t_max * (w - 2 * pad)
    out.append(f'<text x="{pad}" y="20" font-size="14">Latency over time (ms, log scale)</text>')
    for e in range(math.floor(lo), math.ceil(hi) + 1):
        y = sy(10 ** e)
        out.append(f'<line x1="{pad}" x2="{w - pad}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/><text x="5" y="{y + 4:.1f}">{10 ** e:g}</text>')
    out.append(f'<line x1="{pad}" x2="{w - pad}" y1="{sy(slo_ms):.1f}" y2="{sy(slo_ms):.1f}" stroke="red" stroke-dasharray="4"/>'
               f'<text x="{w - pad - 60}" y="{sy(slo_ms) - 4:.1f}" fill="red">SLO {slo_ms:g} ms</text>')
    series = [("client p50", "#1f77b4", [(t, a) for t, a, _, _ in progress]),
              ("client p99", "#ff7f0e", [(t, b) for t, _, b, _ in progress]),
              ("client max", "#aaaaaa", [(t, c) for t, _, _, c in progress]),
              ("server p99 (worst gateway)", "#2ca02c", server_series)]
    for i, (name, colour, pts) in enumerate(series):
        pts = [(t, v) for t, v in pts if v > 0]
        if pts:
            out.append(polyline(pts, colour, sx, sy))
        out.append(f'<text x="{pad + 10 + i * 190}" y="{h - 12}" fill="{colour}">{name}</text>')
    out.append(f'<text x="{w - pad - 80}" y="{h - 28}">time (s) → {t_max:.0f}</text>')

    # 2: percentile distribution.
    y0 = h + 40
    dist_values = [v for v, _ in client_rows + server_rows if v > 0] + [slo_ms]
    sy2, lo2, hi2 = log_axis(min(dist_values + [0.05]), max(dist_values), y0)
    x_hi = 6.0
    sx2 = lambda p: pad + min(-math.log10(max(1 - p, 1e-6)), x_hi) / x_hi * (w - 2 * pad)
    out.append(f'<text x="{pad}" y="{y0 + 20}" font-size="14">Percentile distribution (ms, log scale)</text>')
    for e in range(math.floor(lo2), math.ceil(hi2) + 1):
        y = sy2(10 ** e)
        out.append(f'<line x1="{pad}" x2="{w - pad}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/><text x="5" y="{y + 4:.1f}">{10 ** e:g}</text>')
    for label, p in [("50%", 0.5), ("90%", 0.9), ("99%", 0.99), ("99.9%", 0.999), ("99.99%", 0.9999)]:
        x = sx2(p)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y0 + pad}" y2="{y0 + h - pad}" stroke="#eee"/><text x="{x - 10:.1f}" y="{y0 + h - pad + 14}">{label}</text>')
    out.append(f'<line x1="{pad}" x2="{w - pad}" y1="{sy2(slo_ms):.1f}" y2="{sy2(slo_ms):.1f}" stroke="red" stroke-dasharray="4"/>')
    for name, colour, rows in [("client (send to receive)", "#ff7f0e", client_rows), ("server (ingress to egress, worst gateway)", "#2ca02c", server_rows)]:
        pts = [(p, v) for v, p in rows if v > 0 and p < 1]
        if pts:
            out.append(polyline(pts, colour, sx2, sy2))
    out.append(f'<text x="{pad + 10}" y="{y0 + h + 20}" fill="#ff7f0e">client (send to receive)</text>'
               f'<text x="{pad + 220}" y="{y0 + h + 20}" fill="#2ca02c">server (ingress to egress, worst gateway)</text>')
    out.append("</svg>")
    path.write_text("\n".join(out))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--connections", type=int, required=True)
    ap.add_argument("--gateways", type=int, required=True)
    ap.add_argument("--rss-before-kib", type=int, required=True)
    ap.add_argument("--peak-rss-kib", type=int, required=True)
    ap.add_argument("--cpu-seconds", type=float, required=True)
    ap.add_argument("--clk-tck", type=int, required=True)
    ap.add_argument("--load-status", type=int, required=True)
    ap.add_argument("--slo", required=True)
    ap.add_argument("--redis-cpu-ticks", type=int, default=0)
    ap.add_argument("--redis-processes", type=int, default=0)
    ap.add_argument("--load-cpu-ticks", type=int, default=0)
    a = ap.parse_args()
    res = pathlib.Path(a.results)
    slo_ms = float(re.sub(r"ms$", "", a.slo)) if a.slo.endswith("ms") else float(a.slo.rstrip("s")) * 1000

    load_lines = (res / "load.log").read_text().splitlines()
    progress = []
    for line in load_lines:
        if line.startswith("progress:"):
            d = kv(line)
            progress.append((float(d["t"].rstrip("s")), int(d["p50_us"]) / 1000, int(d["p99_us"]) / 1000, int(d["max_us"]) / 1000))
    summary_line = next((l for l in load_lines if l.startswith("summary:")), "")
    client = kv(summary_line)
    client_rows = distribution(load_lines[load_lines.index(summary_line) + 1:] if summary_line else [])

    servers, server_series = [], {}
    # The store lines of every gateway, summed over the whole run (the ramp's appends too).
    store = {"appended_per_s": 0.0, "groups_per_s": 0.0, "from_nodes_per_s": 0.0, "held": 0, "late": 0,
             "gap_filled": 0, "gap_skipped": 0, "unavailable": 0, "lines": 0}
    for k in range(a.gateways):
        lines = (res / f"gateway-{k}.log").read_text().splitlines()
        for line in lines:
            if line.startswith("store:"):
                d = kv(line)
                store["lines"] += 1
                for key in store:
                    if key in d:
                        store[key] += float(d[key]) if key.endswith("_per_s") else int(d[key])
            if line.startswith("report:"):
                d = kv(line)
                if int(d["count"]) > 0:
                    t = round(float(d["t"].rstrip("s")))
                    server_series[t] = max(server_series.get(t, 0), int(d["p99_us"]) / 1000)
        start = next((i for i, l in enumerate(lines) if l.startswith("latency over the whole run")), None)
        rows = distribution(lines[start + 1:]) if start is not None else []
        count = int(re.search(r"\(ingress to egress, ms; (\d+) messages", lines[start]).group(1)) if start is not None else 0
        server = {"gateway": k, "messages": count, "p50_ms": at(rows, 0.5), "p99_ms": at(rows, 0.99),
                  "p999_ms": at(rows, 0.999), "max_ms": rows[-1][0] if rows else 0.0, "rows": rows}
        # "cross-node messages: N (x% of all); p50 a ms, p99 b ms, p99.9 c ms, max d ms"
        cross = next((l for l in lines if l.startswith("cross-node messages: ")), None)
        if cross:
            m = re.search(r"messages: (\d+) .*p50 ([\d.]+) ms, p99 ([\d.]+) ms, p99.9 ([\d.]+) ms, max ([\d.]+) ms", cross)
            if m:
                server["cross_node"] = {"messages": int(m.group(1)), "p50_ms": float(m.group(2)), "p99_ms": float(m.group(3)),
                                        "p999_ms": float(m.group(4)), "max_ms": float(m.group(5))}
        servers.append(server)

    def cpu(path):
        d = {}
        for line in (res / path).read_text().split("\n"):
            # A gateway killed by a fault has no figures.
            parts = line.rsplit(" ", 1)
            if len(parts) == 2 and parts[1].isdigit():
                d[parts[0]] = int(parts[1])
        return d
    start, end = cpu("cpu-start.txt"), cpu("cpu-end.txt")
    thread_cpu = {n: (end[n] - start[n]) / a.clk_tck / a.cpu_seconds * 100 for n in end if n in start and a.cpu_seconds > 0}
    # The shards, and apart from them the store and cluster threads ("gateway-k/store").
    shard_cpu = {n: v for n, v in thread_cpu.items() if "/shard-" in n}
    helper_cpu = {n: v for n, v in thread_cpu.items() if "/shard-" not in n}

    faults = {}
    for line in (res / "load.log").read_text().splitlines():
        if line.startswith("faults: "):
            faults = dict(kv.split("=", 1) for kv in line[len("faults: "):].split())
    # With a fault, connections come and go: what counts is everyone connected at the end.
    up = int(faults["connected_at_end"]) if faults else int(client.get("connections_up", 0))
    rss_growth = (a.peak_rss_kib - a.rss_before_kib) * 1024
    worst = max(servers, key=lambda s: s["p99_ms"]) if servers else None
    passed = a.load_status == 0 and client.get("verdict") == "PASS" and up == a.connections
    summary = {
        "verdict": "PASS" if passed else "FAIL",
        "connections_requested": a.connections,
        "connections_held": up,
        "gateway_processes": a.gateways,
        "server_peak_rss_kib": a.peak_rss_kib,
        "server_bytes_per_connection": round(rss_growth / max(up, 1)),
        "cpu_percent_per_shard": {k: round(v, 1) for k, v in sorted(shard_cpu.items())},
        "cpu_percent_store_and_cluster_threads": {k: round(v, 1) for k, v in sorted(helper_cpu.items())},
        "messages_sent": int(client.get("sent", 0)),
        "messages_delivered": int(client.get("received", 0)),
        "messages_lost": int(client.get("lost", 0)),
        "duplicates": int(client.get("duplicates", 0)),
        "reordered": int(client.get("reordered", 0)),
        "failed_handshakes": int(client.get("failed_handshakes", 0)),
        "unexpected_closes": int(client.get("unexpected_closes", 0)),
        "client_latency_ms": {q: int(client.get(f"{q}_us", 0)) / 1000 for q in ["p50", "p90", "p99", "p999", "max"]},
        "server_latency_ms": [{k: v for k, v in s.items() if k != "rows"} for s in servers],
        "slo_ms": slo_ms,
    }
    cross_received = int(client.get("cross_node_received", 0))
    if cross_received or any("cross_node" in s for s in servers):
        summary["cross_node"] = {
            "messages_delivered": cross_received,
            "share_pct": round(cross_received * 100 / max(int(client.get("received", 0)), 1), 2),
            "client_latency_ms": {q: int(client.get(f"cross_{q}_us", 0)) / 1000 for q in ["p50", "p90", "p99", "p999", "max"]},
            "server_messages": sum(s.get("cross_node", {}).get("messages", 0) for s in servers),
        }
    text = [
        f"soak {summary['verdict']}: {up}/{a.connections} connections held over {a.gateways} gateway process(es)",
        f"server memory: peak RSS {a.peak_rss_kib / 1024:.1f} MiB in all, {summary['server_bytes_per_connection']} bytes per connection (growth over the idle gateways)",
        "CPU per shard during the hold: " + ", ".join(f"{k} {v:.0f}%" for k, v in summary["cpu_percent_per_shard"].items()),
        f"messages: sent {summary['messages_sent']}, delivered {summary['messages_delivered']}, lost {summary['messages_lost']}, "
        f"duplicated {summary['duplicates']}, reordered {summary['reordered']}; failed handshakes {summary['failed_handshakes']}, unexpected closes {summary['unexpected_closes']}",
        "client latency (send to receive): " + ", ".join(f"{q} {v:.3f} ms" for q, v in summary["client_latency_ms"].items()) + f"  (SLO {slo_ms:g} ms)",
    ]
    if helper_cpu:
        text.append("CPU of the store and cluster threads: " + ", ".join(f"{k} {v:.0f}%" for k, v in sorted(helper_cpu.items())))
    if store["lines"] and store["appended_per_s"] > 0:
        # Rates are summed over the soak's 5 s report lines: messages = rate x 5 s per line.
        # A group is one sync (embedded) or one pipeline: one round trip to one Redis, one
        # per primary it touches on a Redis Cluster.
        s = {k.removesuffix("_per_s"): round(v * 5) if k.endswith("_per_s") else v
             for k, v in store.items() if k != "lines"}
        s["groups_per_message"] = round(store["groups_per_s"] / store["appended_per_s"], 4)
        summary["store"] = s
        text.append(f"store: {s['appended']} messages appended in {s['groups']} groups "
                    f"({s['groups_per_message']:.3f} groups per message); from other nodes {s['from_nodes']}, "
                    f"held for order {store['held']}, late {store['late']}, gaps filled {store['gap_filled']}, skipped {store['gap_skipped']}, "
                    f"unavailable {store['unavailable']}")
    if a.redis_processes and a.cpu_seconds > 0:
        redis_pct = a.redis_cpu_ticks / a.clk_tck / a.cpu_seconds * 100
        summary["redis_cpu_percent"] = round(redis_pct, 1)
        text.append(f"redis: {redis_pct:.0f}% of a core during the hold ({a.redis_processes} server process(es))")
    if a.load_cpu_ticks and a.cpu_seconds > 0:
        load_pct = a.load_cpu_ticks / a.clk_tck / a.cpu_seconds * 100
        summary["load_cpu_percent"] = round(load_pct, 1)
        text.append(f"load generator: {load_pct:.0f}% of a core during the hold (it shares the machine's cores)")
    if faults:
        summary["faults"] = {k: int(v) for k, v in faults.items()}
        text.append("faults: " + " ".join(f"{k}={v}" for k, v in faults.items()))
    if "cross_node" in summary:
        c = summary["cross_node"]
        text.append(f"cross-node: {c['messages_delivered']} messages ({c['share_pct']:g}% of delivered) crossed nodes through NATS; client latency "
                    + ", ".join(f"{q} {v:.3f} ms" for q, v in c["client_latency_ms"].items()))
    for s in servers:
        text.append(f"server latency, gateway {s['gateway']} (ingress to egress, {s['messages']} messages): p50 {s['p50_ms']:.3f} ms, p99 {s['p99_ms']:.3f} ms, p99.9 {s['p999_ms']:.3f} ms, max {s['max_ms']:.3f} ms")
        if "cross_node" in s:
            x = s["cross_node"]
            text.append(f"  of which cross-node ({x['messages']} messages, ingress on another node to egress here): p50 {x['p50_ms']:.3f} ms, p99 {x['p99_ms']:.3f} ms, p99.9 {x['p999_ms']:.3f} ms, max {x['max_ms']:.3f} ms")
    text.append(f"results: {res}")
    print("\n".join(text))
    (res / "summary.txt").write_text("\n".join(text) + "\n")
    (res / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    chart(progress, sorted(server_series.items()), client_rows, worst["rows"] if worst else [], slo_ms, res / "latency.svg")
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
