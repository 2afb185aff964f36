"""The CDN benchmark's origin and clients.

origin PORT [NAME]: objects /obj/N (1 KiB, cacheable for an hour); /stats
answers "requests distinct" since the last /reset; /live answers NAME,
uncacheable.

failover SECONDS KILL_AT PORT,PORT: 4 clients sending GET /live to the
edges for SECONDS; the caller kills a region's machines at KILL_AT. Prints
"requests errors switch_ms settle_ms p50_before_ms p50_after_ms": when the
answers stopped coming from the dead region, and when the latency was back
within twice its new median.

load SEED REQUESTS ZIPF_S REGIONS: the same Zipf-distributed sequence over
10,000 objects for every set-up (seeded), from 4 clients in each region,
each region's requests spread over its edges. REGIONS is
"port,port;port,port;..." (one group per region). Prints
"requests distinct errors".
"""
import http.client, http.server, random, sys, threading

OBJECTS = 10_000


def origin(port, name="origin"):
    seen, lock, count = set(), threading.Lock(), [0]

    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def do_GET(self):
            if self.path == "/stats":
                body = ("%d %d" % (count[0], len(seen))).encode()
            elif self.path == "/reset":
                with lock:
                    count[0] = 0
                    seen.clear()
                body = b"ok"
            elif self.path == "/live":
                body = name.encode()
            elif self.path.startswith("/obj/"):
                with lock:
                    count[0] += 1
                    seen.add(self.path)
                body = b"o" * 1024
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            cc = "max-age=3600" if self.path.startswith("/obj/") else "no-store"
            if self.path == "/live":
                self.send_header("Connection", "close")
            self.send_header("Cache-Control", cc)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    class S(http.server.ThreadingHTTPServer):
        request_queue_size = 1024
        daemon_threads = True

    S(("127.0.0.1", port), H).serve_forever()


def load(seed, requests, s, regions):
    regions = [[int(p) for p in g.split(",")] for g in regions.split(";")]
    rng = random.Random(seed)
    weights = [1 / (k ** s) for k in range(1, OBJECTS + 1)]
    keys = rng.choices(range(OBJECTS), weights=weights, k=requests)
    # Request i comes from region i mod R, at one of its edges.
    jobs = [[] for _ in range(len(regions) * 4)]
    for i, k in enumerate(keys):
        r = i % len(regions)
        edge = regions[r][rng.randrange(len(regions[r]))]
        jobs[r * 4 + (i // len(regions)) % 4].append((edge, k))
    errors = [0]

    def client(job):
        conns = {}
        for edge, k in job:
            c = conns.get(edge) or http.client.HTTPConnection("127.0.0.1", edge, timeout=30)
            conns[edge] = c
            try:
                c.request("GET", "/obj/%d" % k, headers={"Host": "bench.localhost"})
                r = c.getresponse()
                body = r.read()
                if r.status != 200 or len(body) != 1024:
                    errors[0] += 1
            except Exception:
                errors[0] += 1
                c.close()
                conns.pop(edge, None)

    threads = [threading.Thread(target=client, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(requests, len(set(keys)), errors[0])


def failover(seconds, kill_at, ports):
    import time
    ports = [int(p) for p in ports.split(",")]
    start = time.monotonic()
    log, lock = [], threading.Lock()

    def client(i):
        c = None
        n = 0
        while time.monotonic() - start < seconds:
            edge = ports[(i + n) % len(ports)]
            n += 1
            t0 = time.monotonic()
            try:
                c = http.client.HTTPConnection("127.0.0.1", edge, timeout=10)
                c.request("GET", "/live", headers={"Host": "bench.localhost"})
                r = c.getresponse()
                body = r.read().decode()
                ok = r.status == 200
            except Exception:
                body, ok = "", False
            finally:
                if c:
                    c.close()
            with lock:
                log.append((t0 - start, time.monotonic() - t0, ok, body))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.sort()
    errors = sum(1 for e in log if not e[2])
    after = [e for e in log if e[0] >= kill_at]
    before = sorted(e[1] for e in log if e[0] < kill_at)
    dead = log[0][3] if log else ""
    # The last answer from the dead region (or its failure), after the kill.
    switch = max([e[0] + e[1] - kill_at for e in after if e[3] == dead or not e[2]] or [0])
    lat = sorted(e[1] for e in after[len(after) // 2:])
    median = lat[len(lat) // 2] if lat else 0
    settle = max([e[0] + e[1] - kill_at for e in after if e[1] > 2 * median] or [0])
    p50 = lambda v: v[len(v) // 2] * 1000 if v else 0
    print(len(log), errors, "%.0f" % (switch * 1000), "%.0f" % (settle * 1000),
          "%.1f" % p50(before), "%.1f" % (median * 1000))


if __name__ == "__main__":
    if sys.argv[1] == "origin":
        origin(int(sys.argv[2]), *(sys.argv[3:4]))
    elif sys.argv[1] == "failover":
        failover(float(sys.argv[2]), float(sys.argv[3]), sys.argv[4])
    else:
        load(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5])
