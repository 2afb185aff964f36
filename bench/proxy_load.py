"""Throughput and round trips to ADDR's two services, the same way for a
direct address and for `hangar proxy`: PORT_SINK reads a stream to its end
and answers the byte count; PORT_ECHO echoes. Prints
"<MB/s> <p50 us> <p99 us>"."""
import socket
import sys
import time


def sink(host, port, total):
    s = socket.create_connection((host, port))
    chunk = b"x" * (256 << 10)
    t0 = time.perf_counter()
    sent = 0
    while sent < total:
        s.sendall(chunk)
        sent += len(chunk)
    s.shutdown(socket.SHUT_WR)
    answer = b""
    while True:
        b = s.recv(4096)
        if not b:
            break
        answer += b
    took = time.perf_counter() - t0
    assert int(answer.split()[0]) == sent, answer
    return sent / took / 1e6


def echo(host, port, rounds):
    s = socket.create_connection((host, port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        s.sendall(b"x")
        got = s.recv(16)
        assert got, "echo closed"
        times.append((time.perf_counter() - t0) * 1e6)
    times.sort()
    return times[len(times) // 2], times[int(len(times) * 0.99)]


host, sink_port, echo_port, mb, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
sink(host, sink_port, 8 << 20)  # warm
rate = max(sink(host, sink_port, mb << 20) for _ in range(3))
p50, p99 = echo(host, echo_port, rounds)
print(f"{rate:.1f} {p50:.0f} {p99:.0f}")
