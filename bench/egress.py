"""Measurements for bench/egress.sh: direct vs through the proxy, same run."""
import socket, socketserver, statistics, sys, threading, time

BIG = b"x" * (1 << 20)

class Origin(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True

class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        while True:
            line = self.rfile.readline()
            if not line:
                return
            path = line.split()[1].decode()
            while self.rfile.readline() not in (b"\r\n", b""):
                pass
            body = BIG if path.endswith("/big") else b"ok"
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)

def read_response(f):
    length = 0
    while True:
        line = f.readline()
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
        if line in (b"\r\n", b""):
            break
    return f.read(length)

def run(mode, port, proxy, path, n):
    """n requests on one connection; returns per-request seconds."""
    times = []
    if mode == "direct":
        s = socket.create_connection(("127.0.0.1", port))
        target = path
    elif mode == "connect":
        s = socket.create_connection(("127.0.0.1", proxy))
        s.sendall(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: x\r\n\r\n" % port)
        f = s.makefile("rb")
        while f.readline() not in (b"\r\n", b""):
            pass
        target = path
    else:
        s = socket.create_connection(("127.0.0.1", proxy))
        target = "http://127.0.0.1:%d%s" % (port, path)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    f = s.makefile("rb")
    for _ in range(n):
        t0 = time.perf_counter()
        s.sendall(("GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % target).encode())
        body = read_response(f)
        times.append(time.perf_counter() - t0)
        assert len(body) in (2, len(BIG)), len(body)
    s.close()
    return times

def main():
    origin_port, proxy_port = int(sys.argv[1]), int(sys.argv[2])
    server = Origin(("127.0.0.1", origin_port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    time.sleep(0.2)
    for mode in ["direct", "http", "connect"]:
        run(mode, origin_port, proxy_port, "/small", 50)  # warm up
    res = {}
    for mode in ["direct", "http", "connect"]:
        small = run(mode, origin_port, proxy_port, "/small", 500)
        big = run(mode, origin_port, proxy_port, "/big", 100)
        res[mode] = (statistics.median(small), len(big) * len(BIG) / sum(big))
    d_lat, d_tp = res["direct"]
    print(f"direct:          median {d_lat*1e6:7.0f} us/request   {d_tp/1e6:7.1f} MB/s on 1 MB responses")
    for mode in ["http", "connect"]:
        lat, tp = res[mode]
        print(f"proxy {mode:8}  median {lat*1e6:7.0f} us/request   {tp/1e6:7.1f} MB/s   "
              f"added {(lat-d_lat)*1e6:5.0f} us (goal <= 200)   throughput loss {100*(1-tp/d_tp):4.1f}% (goal <= 5%)")

main()
