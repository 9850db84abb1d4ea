"""Good requests to `sejd serve` while slow clients hold connections open, against the same service idle.

    python benchmarks/serve_slow_clients.py builtin:digits --backend torch --stalled 200 --json out.json

Starts `sejd serve SOURCE` (the command itself, on loopback), then alternates rounds: idle (only the good
clients) and loaded (`--stalled` connections held open the whole round: half send headers and part of a
body, half send their headers one byte every 0.5 s; each one the server closes is reopened at once, so
the count stays up). In each round `--clients` threads send `--requests` good requests (n = 1). Reports
the median latency, p90 and throughput per condition (the median over rounds), their loaded/idle ratios
against the issue's goals (latency within 2x, throughput at least 90 % of idle), and how the server
answered the slow clients.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

PARTIAL_BODY = b"POST /sample HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"
SLOW_HEAD = b"POST /sample HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


def post(port, body, timeout=120):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/sample", data=json.dumps(body).encode(), method="POST")
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        status = e.code
    except OSError:
        status = None
    return status, time.perf_counter() - t0


def good_round(port, requests, clients, plan, seed0):
    bodies = [{"n": 1, "seed": seed0 + i, "plan": plan} for i in range(requests)]
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda b: post(port, b), bodies))
    wall = time.perf_counter() - t0
    lat = sorted(r[1] for r in results)
    return {"requests_per_s": requests / wall, "p50_ms": 1e3 * lat[len(lat) // 2],
            "p90_ms": 1e3 * lat[min(len(lat) - 1, int(0.9 * len(lat)))],
            "errors": sum(r[0] != 200 for r in results)}


class SlowClients:
    """`count` connections held open on an asyncio loop in a thread, each reopened when the server closes it;
    `answers` counts the statuses the server closed them with (None: closed without an answer)."""

    def __init__(self, port, count):
        self.port, self.count, self.answers, self.open = port, count, {}, 0
        self.loop = asyncio.new_event_loop()
        self.stop = None
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._main(),), daemon=True)

    async def _main(self):
        self.stop = asyncio.Event()
        tasks = [asyncio.ensure_future(self._client(i % 2 == 0)) for i in range(self.count)]
        await self.stop.wait()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _client(self, partial_body):
        while True:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.1)
                continue
            self.open += 1
            try:
                if partial_body:
                    writer.write(PARTIAL_BODY)
                    answer = await reader.read()
                else:
                    answer = b""
                    for byte in SLOW_HEAD:
                        writer.write(bytes([byte]))
                        try:  # read(n) returns what has come; a timeout loses nothing
                            answer = await asyncio.wait_for(reader.read(65536), 0.5)
                        except asyncio.TimeoutError:
                            continue
                        answer += await reader.read()  # the server answered: the rest, until it closes
                        break
                status = int(answer.split()[1]) if answer.startswith(b"HTTP/") else None
            except (ConnectionError, OSError):
                status = None
            finally:
                self.open -= 1
                writer.close()
            self.answers[status] = self.answers.get(status, 0) + 1

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while self.open < self.count and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # the slow headers under way
        return self

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(30)


def start_server(source, backend, port, extra):
    cmd = [sys.executable, "-m", "sejd.cli", "serve", source, "--backend", backend, "--host", "127.0.0.1",
           "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                if r.status == 200:
                    return proc
        except (OSError, ValueError):
            pass
        if proc.poll() is not None:
            raise SystemExit(f"sejd serve exited with {proc.returncode}")
        time.sleep(1)
    stop_server(proc)
    raise SystemExit("sejd serve did not come up in 600 s")


def stop_server(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the session this script started
        proc.wait()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source")
    p.add_argument("--backend", default="auto")
    p.add_argument("--stalled", type=int, default=200, help="slow connections held open in a loaded round")
    p.add_argument("--requests", type=int, default=100, help="good requests per round")
    p.add_argument("--clients", type=int, default=4, help="threads sending the good requests")
    p.add_argument("--rounds", type=int, default=2, help="rounds per condition, alternating idle and loaded")
    p.add_argument("--plan", default="sequential")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = start_server(a.source, a.backend, port, [])
    rows = {"idle": [], "loaded": []}
    answers: dict = {}
    try:
        for i in range(3):
            post(port, {"n": 1, "seed": i, "plan": a.plan})  # warm-up
        for r in range(a.rounds):
            rows["idle"].append(good_round(port, a.requests, a.clients, a.plan, 1000 * r))
            with SlowClients(port, a.stalled) as slow:
                row = good_round(port, a.requests, a.clients, a.plan, 1000 * r + 500)
                row["slow_open"] = slow.open
            rows["loaded"].append(row)
            for k, v in slow.answers.items():
                answers[k] = answers.get(k, 0) + v
            for cond in ("idle", "loaded"):
                x = rows[cond][-1]
                print(f"round {r} {cond:>6}: {x['requests_per_s']:6.1f} req/s, p50 {x['p50_ms']:7.1f} ms, "
                      f"p90 {x['p90_ms']:7.1f} ms, errors {x['errors']}"
                      + (f", slow connections open {x['slow_open']}" if cond == "loaded" else ""), flush=True)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics.json", timeout=30) as r:
            served = json.loads(r.read())["status"]
    finally:
        stop_server(proc)

    def med(cond, key):
        return statistics.median(x[key] for x in rows[cond])
    summary = {k: {cond: med(cond, k) for cond in rows} for k in ("requests_per_s", "p50_ms", "p90_ms")}
    latency_ratio = summary["p50_ms"]["loaded"] / summary["p50_ms"]["idle"]
    throughput_ratio = summary["requests_per_s"]["loaded"] / summary["requests_per_s"]["idle"]
    print(f"idle:   {summary['requests_per_s']['idle']:6.1f} req/s, p50 {summary['p50_ms']['idle']:7.1f} ms, "
          f"p90 {summary['p90_ms']['idle']:7.1f} ms")
    print(f"loaded: {summary['requests_per_s']['loaded']:6.1f} req/s, p50 {summary['p50_ms']['loaded']:7.1f} ms, "
          f"p90 {summary['p90_ms']['loaded']:7.1f} ms ({a.stalled} slow connections)")
    print(f"p50 latency x{latency_ratio:.2f} (goal <= 2), throughput {100 * throughput_ratio:.0f} % of idle "
          f"(goal >= 90 %); slow clients answered {dict(sorted(answers.items(), key=str))}; "
          f"the app counted {served}")
    if a.json:
        from sejd.core.files import write_json
        write_json(a.json, {"source": a.source, "backend": a.backend, "stalled": a.stalled, "requests": a.requests,
                            "clients": a.clients, "plan": a.plan, "rounds": rows, "summary": summary,
                            "latency_ratio": latency_ratio, "throughput_ratio": throughput_ratio,
                            "slow_answers": {str(k): v for k, v in answers.items()}, "app_statuses": served})


if __name__ == "__main__":
    main()
