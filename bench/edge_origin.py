"""The benchmark's origin: /1k and /100k (cacheable for an hour),
/storm/* (cacheable, answered after DELAY ms; counted) and /obj/N
(cacheable, Surrogate-Key tag-(N mod 100))."""
import http.server, sys, threading

port, delay = int(sys.argv[1]), float(sys.argv[2]) / 1000
bodies = {"/1k": b"x" * 1024, "/100k": b"y" * 102400}
storm = [0]
lock = threading.Lock()

class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: without this, each answer on a
    # kept-alive connection waits ~40 ms for the client's delayed ACK.
    disable_nagle_algorithm = True
    def do_GET(self):
        if self.path == "/count":
            body = str(storm[0]).encode()
        elif self.path.startswith("/obj/"):
            body = b"o" * 512
        elif self.path.startswith("/storm/"):
            with lock:
                storm[0] += 1
            import time; time.sleep(delay)
            body = b"z" * 4096
        else:
            body = bodies.get(self.path)
            if body is None:
                self.send_error(404); return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store" if self.path == "/count" else "max-age=3600")
        if self.path.startswith("/obj/"):
            self.send_header("Surrogate-Key", "tag-%d" % (int(self.path[5:]) % 100))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass

class S(http.server.ThreadingHTTPServer):
    request_queue_size = 1024
    daemon_threads = True

S(("127.0.0.1", port), H).serve_forever()
