#!/usr/bin/env python3
"""The cluster directory at 10-100 nodes: directory-sim on a nats-server of its own.

Runs, one after the other:
  1. both directories (replicated and sharded) at --small-users users per node: the
     replicated one holds nodes x nodes x users entries in this one host, so it is run
     small;
  2. the sharded one at --users users per node;
  3. nats-server's memory per subscription (one raw client subscribing --subs subjects):
     the cost of putting the directory in NATS's interest graph instead.

Writes results/directory/{runs.json, table.md, directory.svg} and prints the table.
docs/cluster-directory.md reads the figures; bench/README.md has the table and plot.
"""
import argparse
import json
import math
import pathlib
import socket
import subprocess
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from benchlib import Server, free_port  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent


def sim(binary, url, nodes, users, directories, warmup, duration, out):
    cmd = [str(binary), "--nats", url, "--nodes", nodes, "--users", str(users), "--directory", directories,
           "--warmup", warmup, "--duration", duration, "--json", str(out)]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def round_trip(s, first=b""):
    """Sends `first` and a PING, and waits for the PONG: the server has handled all before it."""
    s.sendall(first + b"PING\r\n")
    buf = b""
    while b"PONG" not in buf:
        buf += s.recv(65536)


def bytes_per_subscription(nats, subs):
    """nats-server's resident memory per subscription of one client, over `subs` subjects."""
    s = socket.create_connection(("127.0.0.1", nats.port))
    s.recv(4096)
    round_trip(s, b'CONNECT {"verbose":false,"pedantic":false}\r\n')
    before = nats.status_kib("VmRSS")
    for start in range(0, subs, 5000):
        s.sendall(b"".join(b"SUB sg.u.user-%d %d\r\n" % (i, i + 1) for i in range(start, min(subs, start + 5000))))
    round_trip(s)
    after = nats.status_kib("VmRSS")
    s.close()
    return (after - before) * 1024 / subs


def table(rows):
    lines = ["| directory | nodes | users/node | directory per node, mean (max) | per local user | presence + directory msgs/node/s | KiB/node/s | routed: sent / delivered / absent / unavailable / \"offline\" | sends needing a lookup | lookup p50 / p99 | send to arrival p50 / p99 | host CPU |",
             "|---|---:|---:|---|---:|---:|---:|---|---:|---|---|---:|"]
    for r in rows:
        lines.append(
            f"| {r['directory']} | {r['nodes']} | {r['users_per_node']:,} | "
            f"{r['dir_bytes_per_node_mean'] / 1048576:.1f} ({r['dir_bytes_per_node_max'] / 1048576:.1f}) MiB | "
            f"{r['dir_bytes_per_local_user']:,.0f} B | {r['presence_msgs_per_node_per_s']:.0f} | {r['presence_kib_per_node_per_s']:.1f} | "
            f"{r['sent']:,} / {r['delivered']:,} / {r['absent']} / {r['unavailable']} / {r['said_offline']} | "
            f"{r['lookup_share'] * 100:.0f}% | "
            + (f"{r['lookup_p50_us'] / 1000:.2f} / {r['lookup_p99_us'] / 1000:.2f} ms" if r["directory"] == "sharded" else "–")
            + f" | {r['route_p50_us'] / 1000:.2f} / {r['route_p99_us'] / 1000:.2f} ms | {r['host_cpu_busy'] * 100:.0f}% |")
    return "\n".join(lines)


def converged(r):
    """Did the run hold up (nearly every routed message arrived)? A run that saturated the
    host is left out of the plot, and said so under it."""
    return r["delivered"] >= 0.99 * r["sent"]


def plot(rows, path):
    """Two panels against the node count: the directory's memory per node (log scale) and
    the presence and directory messages each node receives per second."""
    failed = [r for r in rows if not converged(r)]
    rows = [dict(r, dir_mib_per_node=r["dir_bytes_per_node_mean"] / 1048576) for r in rows if converged(r)]
    w, h, left, gap, bottom, top = 900, 360, 70, 90, 60, 30
    pw = (w - left - gap - 20) / 2
    nodes = sorted({r["nodes"] for r in rows})
    x_hi = max(nodes) * 1.05
    series = {}
    for r in rows:
        series.setdefault((r["directory"], r["users_per_node"]), []).append(r)
    colours = {"replicated": "#d62728", "sharded": "#1f77b4"}
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
           f'<rect width="{w}" height="{h}" fill="white"/>']

    def panel(x0, key, title, log):
        values = [r[key] for r in rows if r[key] > 0]
        if log:
            lo, hi = math.floor(math.log10(min(values))), math.ceil(math.log10(max(values)))
            def sy(v):
                return top + (hi - math.log10(max(v, 10.0**lo))) / (hi - lo) * (h - top - bottom)
            ticks = [10.0**e for e in range(lo, hi + 1)]
        else:
            hi = max(values) * 1.1
            def sy(v):
                return top + (1 - v / hi) * (h - top - bottom)
            ticks = [hi * i / 4 for i in range(5)]

        def sx(n):
            return x0 + n / x_hi * pw
        out.append(f'<text x="{x0 + pw / 2}" y="{top - 10}" text-anchor="middle" font-weight="bold">{title}</text>')
        out.append(f'<line x1="{x0}" y1="{h - bottom}" x2="{x0 + pw}" y2="{h - bottom}" stroke="black"/>')
        out.append(f'<line x1="{x0}" y1="{top}" x2="{x0}" y2="{h - bottom}" stroke="black"/>')
        out.append(f'<text x="{x0 + pw / 2}" y="{h - bottom + 30}" text-anchor="middle">nodes</text>')
        for n in nodes:
            out.append(f'<text x="{sx(n):.1f}" y="{h - bottom + 14}" text-anchor="middle">{n}</text>')
        for t in ticks:
            label = f"{t:g} MiB" if key == "dir_mib_per_node" else f"{t:.0f}"
            out.append(f'<text x="{x0 - 4}" y="{sy(t) + 4:.1f}" text-anchor="end">{label}</text>')
        for (directory, users), ours in sorted(series.items()):
            colour = colours.get(directory, "black")
            dash = ' stroke-dasharray="6 4"' if users < max(u for _, u in series) else ""
            ours = sorted(ours, key=lambda r: r["nodes"])
            points = " ".join(f"{sx(r['nodes']):.1f},{sy(r[key]):.1f}" for r in ours)
            out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2"{dash} points="{points}"/>')
            out.extend(f'<circle cx="{sx(r["nodes"]):.1f}" cy="{sy(r[key]):.1f}" r="3" fill="{colour}"/>' for r in ours)

    panel(left, "dir_mib_per_node", "directory memory per node (log scale)", True)
    panel(left + pw + gap, "presence_msgs_per_node_per_s", "presence + directory messages per node per second", False)
    for i, (directory, users) in enumerate(sorted(series)):
        dash = " (dashed)" if users < max(u for _, u in series) else ""
        out.append(f'<text x="{left + 10}" y="{top + 14 * (i + 1)}" fill="{colours.get(directory, "black")}">'
                   f'{directory}, {users:,} users per node{dash}</text>')
    for i, r in enumerate(failed):
        out.append(f'<text x="{left}" y="{h - 8 + 12 * i - 12 * (len(failed) - 1)}">Not drawn: {r["directory"]} at {r["nodes"]} nodes '
                   f'x {r["users_per_node"]:,} users did not hold up (the host saturated; {r["delivered"]:,} of {r["sent"]:,} delivered).</text>')
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", default="10,25,50,100")
    p.add_argument("--users", type=int, default=20000, help="users per node, sharded run")
    p.add_argument("--small-users", type=int, default=2000, help="users per node, both directories")
    p.add_argument("--warmup", default="40s")
    p.add_argument("--duration", default="20s")
    p.add_argument("--subs", type=int, default=200000)
    p.add_argument("--results", default="results/directory")
    p.add_argument("--report-only", action="store_true", help="table and plot of the runs already in --results")
    args = p.parse_args()
    results = (ROOT / args.results).resolve()
    results.mkdir(parents=True, exist_ok=True)
    runs = results / "runs.json"
    if not args.report_only:
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "shardgate-bench", "--bin", "directory-sim"],
                       cwd=ROOT, check=True)
        binary = ROOT / "target/release/directory-sim"
        port = free_port()
        nats = Server(["nats-server", "-a", "127.0.0.1", "-p", str(port)], port, results / "nats.log", "nats-server")
        try:
            url = f"nats://127.0.0.1:{port}"
            rows = sim(binary, url, args.nodes, args.small_users, "replicated,sharded", args.warmup, args.duration,
                       results / "small.json")
            rows += sim(binary, url, args.nodes, args.users, "sharded", args.warmup, args.duration, results / "large.json")
        finally:
            nats.stop()
        port = free_port()
        nats = Server(["nats-server", "-a", "127.0.0.1", "-p", str(port)], port, results / "nats-subs.log", "nats-server")
        try:
            per_sub = bytes_per_subscription(nats, args.subs)
        finally:
            nats.stop()
        runs.write_text(json.dumps({"runs": rows, "nats_bytes_per_subscription": per_sub,
                                    "nats_subscriptions": args.subs}, indent=2) + "\n")
    data = json.loads(runs.read_text())
    text = table(data["runs"])
    text += (f"\n\nnats-server: {data['nats_bytes_per_subscription']:.0f} B of resident memory per subscription "
             f"({data['nats_subscriptions']:,} subjects of one client).")
    (results / "table.md").write_text(text + "\n")
    plot(data["runs"], results / "directory.svg")
    print(text)


if __name__ == "__main__":
    main()
