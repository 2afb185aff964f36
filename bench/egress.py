"""Measurements for bench/egress.sh: direct vs through each proxy, same run.

Usage: egress.py ORIGIN_PORT RELAY_PORT NAME=PROXY_PORT...

RELAY_PORT is a plain TCP relay to the origin (socat): no proxy protocol,
one extra hop through user space. It is the floor: what any proxy on this
machine loses to the extra hop before it does any work of its own.

The origin answers GET /small (2 bytes) and GET /big (1 MiB); the client
keeps one connection per run. Both ends avoid Python copies (one prebuilt
response, recv_into a reused buffer), so what a proxy costs is visible.
"""
import socket, socketserver, statistics, sys, threading, time

BIG = 1 << 20
RESPONSES = {
    b"/small": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"/big": b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG + b"x" * BIG,
}

class Origin(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True

class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            line = self.rfile.readline()
            if not line:
                return
            path = line.split()[1]
            while self.rfile.readline() not in (b"\r\n", b""):
                pass
            self.request.sendall(RESPONSES[b"/big" if path.endswith(b"/big") else b"/small"])

class Conn:
    """A client connection with a reused receive buffer."""
    def __init__(self, sock):
        self.s = sock
        self.buf = bytearray(BIG + 4096)
        self.view = memoryview(self.buf)
        self.have = 0  # bytes of the next response already read

    def response(self):
        """Read one response; returns its body length."""
        while True:
            head_end = self.buf.find(b"\r\n\r\n", 0, self.have)
            if head_end >= 0:
                break
            n = self.s.recv_into(self.view[self.have:])
            if n == 0:
                raise EOFError("connection closed")
            self.have += n
        head = bytes(self.buf[:head_end]).lower()
        length = 0
        for line in head.split(b"\r\n"):
            if line.startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        total = head_end + 4 + length
        while self.have < total:
            n = self.s.recv_into(self.view[self.have:total])
            if n == 0:
                raise EOFError("connection closed")
            self.have += n
        rest = self.have - total
        self.buf[:rest] = self.buf[total:self.have]
        self.have = rest
        return length

def connect(mode, port, proxy):
    if mode == "relay":
        return socket.create_connection(("127.0.0.1", RELAY_PORT)), ""
    if mode == "direct":
        s = socket.create_connection(("127.0.0.1", port))
        return s, ""
    s = socket.create_connection(("127.0.0.1", proxy))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if mode == "connect":
        s.sendall(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (port, port))
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(1)
            if not chunk:
                raise EOFError("proxy closed the tunnel")
            head += chunk
        assert b" 200" in head.split(b"\r\n")[0], head
        return s, ""
    return s, "http://127.0.0.1:%d" % port

def run(mode, port, proxy, path, n):
    """n requests on one connection; returns per-request seconds."""
    s, prefix = connect(mode, port, proxy)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = Conn(s)
    request = ("GET %s%s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (prefix, path, port)).encode()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        s.sendall(request)
        length = conn.response()
        times.append(time.perf_counter() - t0)
        assert length == (BIG if path == "/big" else 2), (mode, length)
    s.close()
    return times

def measure(mode, port, proxy, rounds):
    """Median latency of small requests, and 1 MiB throughput (median of rounds)."""
    lat = statistics.median(run(mode, port, proxy, "/small", 400))
    tps = []
    for _ in range(rounds):
        big = run(mode, port, proxy, "/big", 40)
        tps.append(len(big) * BIG / sum(big))
    return lat, statistics.median(tps)

def main():
    origin_port = int(sys.argv[1])
    relay_port = int(sys.argv[2])
    proxies = [(a.split("=")[0], int(a.split("=")[1])) for a in sys.argv[3:]]
    global RELAY_PORT
    RELAY_PORT = relay_port
    server = Origin(("127.0.0.1", origin_port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    time.sleep(0.2)
    modes = [("direct", None, "direct"), ("relay", None, "relay")] + [
        (f"{name} {m}", port, m) for name, port in proxies for m in ("http", "connect")
    ]
    for _, port, m in modes:
        run(m, origin_port, port, "/small", 50)  # warm up
    # Interleaved rounds, so a noisy neighbour hits every mode alike.
    res = {label: ([], []) for label, _, _ in modes}
    for _ in range(3):
        for label, port, m in modes:
            lat, tp = measure(m, origin_port, port, 1)
            res[label][0].append(lat)
            res[label][1].append(tp)
    med = {k: (statistics.median(v[0]), statistics.median(v[1])) for k, v in res.items()}
    d_lat, d_tp = med["direct"]
    print(f"direct:              median {d_lat*1e6:6.0f} us/request   {d_tp/1e6:7.1f} MB/s on 1 MiB responses")
    r_lat, r_tp = med["relay"]
    print(f"socat relay (floor):  median {r_lat*1e6:6.0f} us/request   {r_tp/1e6:7.1f} MB/s   "
          f"added {(r_lat-d_lat)*1e6:5.0f} us   throughput loss {100*(1-r_tp/d_tp):5.1f}% (the extra hop alone)")
    for label, _, _ in modes[2:]:
        lat, tp = med[label]
        print(f"{label:20} median {lat*1e6:6.0f} us/request   {tp/1e6:7.1f} MB/s   "
              f"added {(lat-d_lat)*1e6:5.0f} us (goal <= 100)   throughput loss {100*(1-tp/d_tp):5.1f}% (goal <= 5%)")
    names = [n for n, _ in proxies]
    if len(names) == 2:
        a, b = names
        for m in ("http", "connect"):
            la, ta = med[f"{a} {m}"]
            lb, tb = med[f"{b} {m}"]
            print(f"{m:8} {a}/{b}: added latency {(la-d_lat)/(lb-d_lat):.2f}x   throughput {ta/tb:.2f}x")

main()
