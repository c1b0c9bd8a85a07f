"""Drives the gateway's chat and dashboard pages in a real (headless) Chromium, through
the Chrome DevTools Protocol, and checks what they show. Run by scripts/browser-test.sh,
which starts the gateway and the browser; see there.

    browser-test.py GATEWAY_URL DEVTOOLS_PORT ADMIN_TOKEN SCREENSHOT_DIR

Two chat pages (alice, bob) exchange a direct message and a room message through the
page's own controls; alice reads the conversation's history; a message to carol, who has
no page open, reaches her page when it connects; the dashboard (opened with
an admin token) must show the connections and the messages after the traffic; /metrics
must parse with the Prometheus client's own parser and count the same traffic.
Screenshots of both pages go to SCREENSHOT_DIR.
"""

import base64
import itertools
import json
import sys
import time
import urllib.parse
import urllib.request

import websocket  # websocket-client
from prometheus_client.parser import text_string_to_metric_families

TIMEOUT = 20.0


class Page:
    """One browser tab, driven over its DevTools WebSocket."""

    def __init__(self, devtools_port, url):
        req = urllib.request.Request(
            "http://127.0.0.1:%d/json/new?%s" % (devtools_port, urllib.parse.quote(url, safe="")), method="PUT"
        )
        target = json.load(urllib.request.urlopen(req, timeout=TIMEOUT))
        self.ws = websocket.create_connection(target["webSocketDebuggerUrl"], timeout=TIMEOUT, suppress_origin=True)
        self.ids = itertools.count(1)
        self.call("Emulation.setDeviceMetricsOverride", width=1280, height=860, deviceScaleFactor=1, mobile=False)

    def call(self, method, **params):
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError("%s: %s" % (method, msg["error"]))
                return msg["result"]

    def js(self, expression):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError("%s: %s" % (expression, result["exceptionDetails"]))
        return result["result"].get("value")

    def wait_for(self, expression, what):
        """Evaluates `expression` until it is truthy (a deadline, not a fixed sleep)."""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError("timed out waiting for %s (%s)" % (what, expression))

    def fill_and_click(self, fields, button):
        for field_id, value in fields.items():
            self.js("document.getElementById(%s).value = %s" % (json.dumps(field_id), json.dumps(value)))
        self.js("document.getElementById(%s).click()" % json.dumps(button))

    def screenshot(self, path):
        data = self.call("Page.captureScreenshot", format="png")["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))


def frames_with(kind, text_path):
    """A JS expression: the texts of the received frames of `kind` (at `text_path`)."""
    return "window.chat.frames.filter(f => f.type === %s).map(f => %s)" % (json.dumps(kind), text_path)


def metrics(gateway):
    text = urllib.request.urlopen(gateway + "/metrics", timeout=TIMEOUT).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            out[key] = sample.value
    return out


def total(samples, name, **labels):
    return sum(v for (n, ls), v in samples.items() if n == name and all((k, str(x)) in ls for k, x in labels.items()))


def main():
    gateway, devtools_port, admin_token, shots = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dashboard = Page(devtools_port, gateway + "/dashboard#token=" + admin_token)
    dashboard.wait_for("window.dash && window.dash.events >= 2", "the dashboard's first events")
    sent_before = dashboard.js("window.dash.last.sent")

    alice = Page(devtools_port, gateway + "/?user=alice")
    bob = Page(devtools_port, gateway + "/?user=bob")
    for page, user in ((alice, "alice"), (bob, "bob")):
        page.wait_for("window.chat && window.chat.user === %s" % json.dumps(user), user + "'s ready")
        assert page.js("document.getElementById('status').textContent") == "connected as " + user

    # A direct message, typed into alice's page: bob's page shows it, alice's the ack.
    alice.fill_and_click({"to": "bob", "text": "hello bob, from a browser"}, "send")
    bob.wait_for(
        "%s.includes('hello bob, from a browser')" % frames_with("message", "f.body.text"), "bob's direct message"
    )
    ack = alice.wait_for("Object.values(window.chat.acks).find(a => a.status === 'stored')", "alice's ack")
    assert ack["conv"] == "dm:alice:bob" and ack["seq"] >= 1, ack
    # A room: both join through the page, bob publishes, alice's page shows it.
    for page in (alice, bob):
        page.fill_and_click({"room": "lobby"}, "join")
        page.wait_for("%s.includes('lobby')" % frames_with("joined", "f.room"), "joined lobby")
    bob.fill_and_click({"room": "lobby", "roomtext": "hi lobby"}, "publish")
    alice.wait_for("%s.includes('hi lobby')" % frames_with("room_message", "f.body.text"), "alice's room message")
    # History from the store, asked for through the page.
    alice.fill_and_click({"conv": "dm:alice:bob"}, "history")
    history = alice.wait_for(
        "window.chat.frames.find(f => f.type === 'history' && f.conv === 'dm:alice:bob')", "the history page"
    )
    assert [m["body"]["text"] for m in history["messages"]] == ["hello bob, from a browser"], history
    # The frames are on screen, not only in memory.
    assert "hello bob, from a browser" in bob.js("document.getElementById('log').textContent")
    # Offline delivery: a message to carol, who has no page open yet, is stored; when her
    # page connects, its ready lists the conversation and the page fetches it.
    alice.fill_and_click({"to": "carol", "text": "for when you are back"}, "send")
    alice.wait_for("Object.values(window.chat.acks).some(a => a.conv === 'dm:alice:carol' && a.status === 'stored')",
                   "the ack of the message to carol")
    carol = Page(devtools_port, gateway + "/?user=carol")
    carol.wait_for(
        "window.chat.frames.filter(f => f.type === 'history' && f.conv === 'dm:alice:carol')"
        ".flatMap(f => f.messages.map(m => m.body.text)).includes('for when you are back')",
        "carol's page fetching the message its ready listed",
    )

    # The dashboard's numbers moved: both chat connections and the two sends.
    snap = dashboard.wait_for(
        "window.dash.last.connections >= 4 && window.dash.last.sent >= %d && window.dash.last" % (sent_before + 3),
        "the dashboard to count the traffic",
    )
    shown = dashboard.js("document.getElementById('connections').textContent")
    assert int(shown) == snap["connections"] >= 4, (shown, snap)
    assert dashboard.js("document.getElementById('state').textContent") == "live"

    # /metrics, read by Prometheus' own parser, counts the same traffic.
    samples = metrics(gateway)
    assert total(samples, "shardgate_messages_routed_total", kind="direct") >= 1
    assert total(samples, "shardgate_messages_routed_total", kind="room") >= 1
    assert total(samples, "shardgate_http_responses_total", status="101") >= 2
    assert total(samples, "shardgate_store_appended_total") >= 3
    assert total(samples, "shardgate_latency_seconds_count") >= 2

    alice.screenshot(shots + "/chat.png")
    # A little steady traffic (alice's page sends bob 50 messages a second): the
    # dashboard shows its rate and percentiles, and its chart draws them.
    alice.js("window.ticks = 0; window.load = setInterval(() => "
             "{ window.chat.send({type: 'send', to: 'bob', body: {text: 'tick'}}); window.ticks++; }, 20)")
    # (A busy host throttles the page's timer: half the rate is enough to see it move.)
    busy = dashboard.wait_for(
        "window.dash.last.last_second.delivered >= 10 && window.dash.rates.sent >= 10 && window.dash.last", "the load on the dashboard"
    )
    dashboard.wait_for("window.dash.history.filter(p => p.rate >= 10).length >= 5", "a few seconds of load in the chart")
    p99 = dashboard.js("document.getElementById('p99').textContent")
    assert p99.endswith("s") and p99 != "-", p99
    dashboard.screenshot(shots + "/dashboard.png")
    alice.js("clearInterval(window.load)")
    ticks = alice.js("window.ticks")
    bob.wait_for("%s.filter(t => t === 'tick').length === %d" % (frames_with("message", "f.body.text"), ticks),
                 "every tick alice's page sent")
    print(
        "browser: direct and room messages between two pages, history, offline delivery; dashboard at %d connections, then %d delivered/s (p99 %d us); screenshots in %s"
        % (snap["connections"], busy["last_second"]["delivered"], busy["last_second"]["p99_us"], shots)
    )


if __name__ == "__main__":
    main()
