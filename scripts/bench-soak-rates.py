#!/usr/bin/env python3
"""The 100k soak at rising message rates: where the server's p99 crosses 10 ms.

    scripts/bench-soak-rates.py                                # relay and embedded, 10k..50k msg/s
    scripts/bench-soak-rates.py --stores none --rates 10000,30000,50000,70000 --duration 30s

For each store mode and each total rate, one `scripts/soak.sh` run (100,000 connections by
default, the gateways and the load generator on this host's cores) with the
per-connection rate that gives that total. The table (stdout and rates.md) has, per run:
messages sent and lost, the server p99 over the whole run (the worst gateway and the
median of the gateways), the client p99 and soak.sh's verdict (FAIL when the client p99
is over the SLO or anything is lost), the gateways' and the load generator's CPU (the
load generator shares the cores: a run where it is the limit shows as sent < asked). The
plot (rates.svg) draws the server and client p99 against the rate for each store, with the
10 ms line. Printed last, per store: the highest rate with 0 lost, a PASS verdict and a
server p99 under 10 ms. Each run's own results folder stays under --results.
"""
import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_MS = 10.0


def run(store, rate, args, results):
    out = results / f"{store}-{rate}"
    summary_path = out / "summary.json"
    if (args.reuse or args.report_only) and summary_path.exists():
        print(f"== {store}, {rate} msg/s: reusing {out}", flush=True)
    elif args.report_only:
        return None
    else:
        cmd = ["scripts/soak.sh", "--connections", str(args.connections), "--rate", f"{rate / args.connections:.6g}",
               "--duration", args.duration, "--store", store, "--results", str(out)]
        print(f"== {store}, {rate} msg/s: {' '.join(cmd)}", flush=True)
        summary_path.unlink(missing_ok=True)
        with open(results / f"{store}-{rate}.log", "w") as log:
            status = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
        if not summary_path.exists():
            print(f"   no summary (soak.sh exit {status}); see {results / f'{store}-{rate}.log'}", flush=True)
            return None
    s = json.loads(summary_path.read_text())
    p99s = [g["p99_ms"] for g in s["server_latency_ms"]]
    gateway_cpu = sum(s["cpu_percent_per_shard"].values()) + sum(s.get("cpu_percent_store_and_cluster_threads", {}).values())
    row = {
        "store": store, "rate": rate, "verdict": s["verdict"], "sent": s["messages_sent"],
        "lost": s["messages_lost"], "held": s["connections_held"],
        "server_p99_worst": max(p99s), "server_p99_median": statistics.median(p99s),
        "client_p99": s["client_latency_ms"]["p99"], "gateway_cpu": gateway_cpu,
        "load_cpu": s.get("load_cpu_percent", 0.0),
    }
    print(f"   {row}", flush=True)
    return row


def table(rows, hold_s):
    lines = ["| store | asked msg/s | sent msg/s | lost | connections held | server p99, worst / median gateway | client p99 | soak verdict | gateways' CPU | load generator's CPU |",
             "|---|---:|---:|---:|---:|---|---:|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['store']} | {r['rate']:,} | {r['sent'] / hold_s:,.0f} | {r['lost']} | {r['held']:,} | "
                     f"{r['server_p99_worst']:.2f} / {r['server_p99_median']:.2f} ms | {r['client_p99']:.1f} ms | "
                     f"{r['verdict']} | {r['gateway_cpu']:.0f}% | {r['load_cpu']:.0f}% |")
    return "\n".join(lines)


def plot(rows, path):
    """Server p99 (worst gateway, solid) and client p99 (dashed) against the rate, per
    store, on a log scale (they span five decades), with the 10 ms line."""
    w, h, left, bottom, top, right = 720, 380, 60, 40, 20, 210
    x_hi = max(r["rate"] for r in rows) * 1.05
    values = [v for r in rows for v in (r["server_p99_worst"], r["client_p99"]) if v > 0]
    lo = math.floor(math.log10(min(values + [TARGET_MS])))
    hi = math.ceil(math.log10(max(values + [TARGET_MS])))

    def sx(rate):
        return left + rate / x_hi * (w - left - right)

    def sy(ms):
        return top + (hi - math.log10(max(ms, 10.0**lo))) / (hi - lo) * (h - top - bottom)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<line x1="{left}" y1="{h - bottom}" x2="{w - right}" y2="{h - bottom}" stroke="black"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{h - bottom}" stroke="black"/>',
           f'<line x1="{left}" y1="{sy(TARGET_MS):.1f}" x2="{w - right}" y2="{sy(TARGET_MS):.1f}" stroke="grey" stroke-dasharray="2 2"/>',
           f'<text x="{w - right + 4}" y="{sy(TARGET_MS) + 4:.1f}">10 ms</text>',
           f'<text x="{(left + w - right) / 2}" y="{h - 6}" text-anchor="middle">messages per second (all connections)</text>',
           f'<text x="12" y="{top + (h - top - bottom) / 2}" transform="rotate(-90 12 {top + (h - top - bottom) / 2})" '
           f'text-anchor="middle">p99 (ms, log scale)</text>']
    for i in range(5):
        rate = x_hi * i / 4
        out.append(f'<text x="{sx(rate):.1f}" y="{h - bottom + 14}" text-anchor="middle">{rate / 1000:.0f}k</text>')
    for e in range(lo, hi + 1):
        out.append(f'<text x="{left - 4}" y="{sy(10.0**e) + 4:.1f}" text-anchor="end">{10.0**e:g}</text>')
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    line = 0
    for k, store in enumerate(dict.fromkeys(r["store"] for r in rows)):
        colour = colours[k % len(colours)]
        ours = [r for r in rows if r["store"] == store]
        for key, dash, what in (("server_p99_worst", "", "server p99"), ("client_p99", ' stroke-dasharray="6 4"', "client p99")):
            points = " ".join(f"{sx(r['rate']):.1f},{sy(r[key]):.1f}" for r in ours)
            out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2"{dash} points="{points}"/>')
            out.extend(f'<circle cx="{sx(r["rate"]):.1f}" cy="{sy(r[key]):.1f}" r="3" fill="{colour}"/>' for r in ours)
            line += 1
            out.append(f'<text x="{w - right + 4}" y="{top + 14 * line}" fill="{colour}">{what}, store {store}{" (dashed)" if dash else ""}</text>')
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stores", default="none,embedded", help="store modes, comma-separated (soak.sh --store)")
    p.add_argument("--rates", default="10000,20000,30000,50000", help="total messages per second, comma-separated")
    p.add_argument("--connections", type=int, default=100000)
    p.add_argument("--duration", default="30s", help="hold per run")
    p.add_argument("--results", default="results/soak-rates")
    p.add_argument("--reuse", action="store_true", help="read the runs already in --results instead of running them again")
    p.add_argument("--report-only", action="store_true", help="only the table and plot of the runs already in --results")
    args = p.parse_args()
    results = (ROOT / args.results).resolve()
    results.mkdir(parents=True, exist_ok=True)
    hold_s = float(args.duration.rstrip("s"))
    rows = []
    for store in args.stores.split(","):
        for rate in sorted(int(r) for r in args.rates.split(",")):
            row = run(store, rate, args, results)
            if row:
                rows.append(row)
    if not rows:
        sys.exit("bench-soak-rates: no run finished")
    text = table(rows, hold_s)
    (results / "rates.md").write_text(text + "\n")
    (results / "rates.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot(rows, results / "rates.svg")
    print(text)
    for store in dict.fromkeys(r["store"] for r in rows):
        good = [r["rate"] for r in rows if r["store"] == store and r["lost"] == 0 and r["verdict"] == "PASS"
                and r["server_p99_worst"] < TARGET_MS]
        print(f"store {store}: highest rate with 0 lost and server p99 < {TARGET_MS:g} ms: "
              f"{max(good):,} msg/s" if good else f"store {store}: no rate tried met it")
    print(f"table, plot and each run: {results}")


if __name__ == "__main__":
    main()
