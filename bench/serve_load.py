#!/usr/bin/env python3
"""Closed-loop load on an OpenAI-compatible server: N clients, each sending streaming chat
requests one after another for D seconds. Prints requests, errors, latency p50/p99 (whole
request), time to first token p50, and aggregate completion tokens/s (from the usage chunk).
Standard library only (http.client), so it measures the server, not a client library.

  python3 bench/serve_load.py --url http://127.0.0.1:8080 --clients 16 --duration 120
"""
import argparse
import http.client
import json
import statistics
import threading
import time
import urllib.parse

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a refrigerator works.",
    "List some tips for learning a new language.",
    "Describe the water cycle.",
    "What makes a good cup of coffee?",
    "Give advice to someone starting to run.",
    "Explain what a database index is.",
    "Describe a walk through a forest in autumn.",
]


SCHEMA = None  # --json-schema: the schema every request's answer must fit


def one_request(url, key, prompt, max_tokens, seed):
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.8,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if SCHEMA is not None:
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body), headers)
    resp = conn.getresponse()
    if resp.status != 200:
        resp.read()
        conn.close()
        return None, f"HTTP {resp.status}"
    first = None
    tokens = 0
    done = False
    buf = b""
    while True:
        chunk = resp.read1(65536) if hasattr(resp, "read1") else resp.read(1)
        if not chunk:
            break
        buf += chunk
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                if not line.startswith(b"data: "):
                    continue
                data = line[6:]
                if data == b"[DONE]":
                    done = True
                    continue
                obj = json.loads(data)
                if "error" in obj:
                    conn.close()
                    return None, obj["error"].get("message", "error")
                if obj.get("usage"):
                    tokens = obj["usage"]["completion_tokens"]
                for c in obj.get("choices", []):
                    if c.get("delta", {}).get("content") and first is None:
                        first = time.perf_counter() - t0
    conn.close()
    if not done:
        return None, "stream ended without [DONE]"
    return (time.perf_counter() - t0, first, tokens), None


def run(url, key, clients, duration, max_tokens):
    results, errors = [], []
    lock = threading.Lock()
    stop_at = time.perf_counter() + duration

    def client(i):
        n = 0
        while time.perf_counter() < stop_at:
            prompt = PROMPTS[(i + n) % len(PROMPTS)]
            try:
                r, err = one_request(url, key, prompt, max_tokens, i * 1000 + n)
            except Exception as e:  # a refused or reset connection is an error, not a crash
                r, err = None, repr(e)
            with lock:
                if err:
                    errors.append(err)
                else:
                    results.append(r)
            n += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(r[0] for r in results)
    ttft = sorted(r[1] for r in results if r[1] is not None)
    toks = sum(r[2] for r in results)

    def pct(xs, p):
        if not xs:
            return float("nan")
        return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]

    return {
        "clients": clients,
        "seconds": wall,
        "requests": len(results),
        "errors": len(errors),
        "error_kinds": sorted(set(errors))[:5],
        "latency_p50_s": pct(lat, 50),
        "latency_p99_s": pct(lat, 99),
        "ttft_p50_s": statistics.median(ttft) if ttft else float("nan"),
        "completion_tokens": toks,
        "tokens_per_s": toks / wall,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--key", default="")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=120)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--json-schema", default=None)
    a = ap.parse_args()
    if a.json_schema:
        global SCHEMA
        with open(a.json_schema) as f:
            SCHEMA = json.load(f)
    r = run(a.url, a.key, a.clients, a.duration, a.max_tokens)
    print(json.dumps(r))


if __name__ == "__main__":
    main()
