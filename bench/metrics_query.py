"""Time QUERY through two Prometheus HTTP APIs, alternating, over kept-alive
connections: BASE_A (with TOKEN_A as a bearer, or "-" for none) and BASE_B.
Prints "<p50 a ms> <p99 a ms> <p50 b ms> <p99 b ms> <series a> <series b>"."""
import http.client
import json
import sys
import time
import urllib.parse


def client(base):
    u = urllib.parse.urlparse(base)
    return http.client.HTTPConnection(u.hostname, u.port), u.path.rstrip("/")


def ask(conn, prefix, token, query):
    body = urllib.parse.urlencode({"query": query})
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if token != "-":
        headers["Authorization"] = f"Bearer {token}"
    t0 = time.perf_counter()
    conn.request("POST", f"{prefix}/api/v1/query", body, headers)
    r = conn.getresponse()
    data = r.read()
    took = (time.perf_counter() - t0) * 1000
    assert r.status == 200, data
    result = json.loads(data)["data"]["result"]
    return took, result


base_a, token_a, base_b, query_a, query_b, rounds = sys.argv[1:7]
(a, pa), (b, pb) = client(base_a), client(base_b)
ta, tb = [], []
for i in range(int(rounds)):
    t, ra = ask(a, pa, token_a, query_a)
    ta.append(t)
    t, rb = ask(b, pb, "-", query_b)
    tb.append(t)
ta.sort()
tb.sort()
q = lambda v, p: v[min(len(v) - 1, int(len(v) * p))]
print(f"{q(ta, 0.5):.2f} {q(ta, 0.99):.2f} {q(tb, 0.5):.2f} {q(tb, 0.99):.2f} {ra[0]['value'][1]} {rb[0]['value'][1]}")
