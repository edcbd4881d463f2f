#!/usr/bin/env python3
"""Drift-alert figures against a running registry (started by bench/alerts.sh).

latency URL TOKEN ROUNDS  — time from an instance going stale (the release registration
                             answered) to the webhook receiver holding the alert
fleet URL TOKEN N         — N instances stale at once: messages and alerts per channel
Only the standard library; the receiver listens on 127.0.0.1.
"""
import http.server
import json
import statistics
import sys
import threading
import time
import urllib.request

GOT = []  # (arrival time, path, body)
LOCK = threading.Lock()


class Hook(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        with LOCK:
            GOT.append((time.monotonic(), self.path, json.loads(body or b"null")))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def receiver():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{srv.server_address[1]}"


def call(url, token, method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method)
    req.add_header("Authorization", f"Bearer {token}")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"null")


def register(url, token, version):
    call(url, token, "PUT", "/v1/envs/production/services/bench/release",
         {"version_id": version, "force": True})


def heartbeat(url, token, iid, version):
    call(url, token, "POST", "/v1/instances",
         {"instance_id": iid, "service": "bench", "version_id": version})


def items(body):
    return body.get("alerts", [body]) if isinstance(body, dict) else []


def latency(url, token, rounds):
    hook = receiver()
    call(url, token, "PUT", "/v1/alert-channels",
         {"channels": [{"name": "hook", "type": "webhook", "url": hook + "/hook"}]})
    register(url, token, "v0")
    heartbeat(url, token, "lat-1", "v0")
    samples = []
    for k in range(1, rounds + 1):
        seen = len(GOT)
        t0 = time.monotonic()
        register(url, token, f"v{k}")  # lat-1 (still on v{k-1}) is stale from now
        deadline = t0 + 10
        arrived = None
        while time.monotonic() < deadline and arrived is None:
            with LOCK:
                for t, _, b in GOT[seen:]:
                    if any(i.get("event") == "alert_opened" for i in items(b)):
                        arrived = t
                        break
            time.sleep(0.001)
        if arrived is None:
            print(f"round {k}: no alert within 10 s", file=sys.stderr)
            sys.exit(1)
        samples.append((arrived - t0) * 1000)
        seen = len(GOT)
        heartbeat(url, token, "lat-1", f"v{k}")  # current again: wait until resolved
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with LOCK:
                if any(i.get("event") == "alert_resolved" for _, _, b in GOT[seen:] for i in items(b)):
                    break
            time.sleep(0.01)
    samples.sort()
    p90 = samples[min(len(samples) - 1, int(len(samples) * 0.9))]
    print(f"| stale → webhook holds the alert (thresholds 0, {rounds} rounds) | "
          f"median {statistics.median(samples):.0f} ms | p90 {p90:.0f} ms | max {samples[-1]:.0f} ms |")


def fleet(url, token, n):
    hook = receiver()
    call(url, token, "PUT", "/v1/alert-channels", {"channels": [
        {"name": "hook", "type": "webhook", "url": hook + "/hook"},
        {"name": "slack", "type": "slack", "webhook_url": hook + "/slack"},
    ]})
    register(url, token, "v1")
    for i in range(n):
        heartbeat(url, token, f"fleet-{i:05}", "v1")
    t0 = time.monotonic()
    register(url, token, "v2")  # every instance is stale at once
    deadline = t0 + 30
    while time.monotonic() < deadline:
        with LOCK:
            carried = {p: sum(len(items(b)) for _, q, b in GOT if q == p) for p in ("/hook", "/slack")}
            slack_msgs = sum(1 for _, q, _ in GOT if q == "/slack")
        # Slack shows a count in its text; count what the webhook carried for both.
        if carried["/hook"] >= n and slack_msgs >= 1:
            break
        time.sleep(0.02)
    time.sleep(3)  # anything more would arrive now (the window is longer: it would not)
    with LOCK:
        for path, name in (("/hook", "webhook"), ("/slack", "slack")):
            msgs = [(t, b) for t, q, b in GOT if q == path]
            alerts = sum(len(items(b)) for _, b in msgs) if path == "/hook" else None
            first = f"{(msgs[0][0] - t0) * 1000:.0f} ms" if msgs else "-"
            text = msgs[0][1].get("text", "") if msgs and path == "/slack" else ""
            shown = alerts if alerts is not None else text
            print(f"| {n} instances stale at once → {name} | {len(msgs)} message(s) | "
                  f"{shown} | first after {first} |")


if __name__ == "__main__":
    mode, url, token, arg = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    {"latency": latency, "fleet": fleet}[mode](url, token, arg)
