"""Miss storms: ROUNDS times, CLIENTS requests at once for one cold URL
(a new URL each round) on a slow origin. Prints p50, p99 and max latency
in ms, and how many requests reached the origin (from its counter)."""
import http.client, socket, sys, threading, time, uuid

port, host, rounds, clients = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
lat, errors = [], [0]
lock = threading.Lock()

def one(path, barrier):
    barrier.wait()
    t = time.perf_counter()
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        c.request("GET", path, headers={"Host": host})
        r = c.getresponse()
        body = r.read()
        ok = r.status == 200 and len(body) > 0
    except Exception:
        ok = False
    took = (time.perf_counter() - t) * 1000
    with lock:
        if ok:
            lat.append(took)
        else:
            errors[0] += 1

for _ in range(rounds):
    path = "/storm/" + uuid.uuid4().hex
    barrier = threading.Barrier(clients)
    ts = [threading.Thread(target=one, args=(path, barrier)) for _ in range(clients)]
    for t in ts: t.start()
    for t in ts: t.join()

lat.sort()
pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]
print("%.1f %.1f %.1f %d" % (pick(0.5), pick(0.99), lat[-1], errors[0]))
