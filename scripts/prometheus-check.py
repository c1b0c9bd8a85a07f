"""Checks deploy/grafana-dashboard.json against a real Prometheus that scrapes a gateway:
every panel's query must be valid PromQL and return series (the cluster panel excepted
when the gateway runs alone). Run by scripts/browser-test.sh.

    prometheus-check.py PROMETHEUS_URL DASHBOARD_JSON
"""

import json
import sys
import time
import urllib.parse
import urllib.request

TIMEOUT = 30.0


def query(prom, expr):
    url = prom + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    answer = json.load(urllib.request.urlopen(url, timeout=10))
    if answer.get("status") != "success":
        raise AssertionError("%s: %s" % (expr, answer))
    return answer["data"]["result"]


def main():
    prom, dashboard_file = sys.argv[1], sys.argv[2]
    dashboard = json.load(open(dashboard_file))
    # rate() needs two scrapes in its window: wait for a few (the config scrapes each second).
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            up = query(prom, 'count_over_time(up{job="shardgate"}[1m])')
            if up and float(up[0]["value"][1]) >= 4 and query(prom, 'up{job="shardgate"} == 1'):
                break
        except OSError:
            pass  # Prometheus is still starting
        if time.monotonic() > deadline:
            raise AssertionError("Prometheus never scraped the gateway")
        time.sleep(0.2)
    checked = 0
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("$job", ".*").replace("$instance", ".*")
            result = query(prom, expr)
            alone = panel["title"].startswith("Cluster")
            if not result and not alone:
                raise AssertionError("panel %r: %s returned no series" % (panel["title"], expr))
            checked += 1
    print("prometheus: scraped the gateway; all %d queries of the %d dashboard panels are valid and return series"
          % (checked, len(dashboard["panels"])))


if __name__ == "__main__":
    main()
