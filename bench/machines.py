"""Measurements for bench/machines.sh (see there)."""
import json, os, shutil, statistics, subprocess, sys, time, urllib.request

def api(home, method, path, body=None):
    cfg = dict(line.split(" = ", 1) for line in open(os.path.join(home, "config.toml")).read().splitlines() if " = " in line)
    base, token = cfg["api"].strip('"'), cfg["token"].strip('"')
    req = urllib.request.Request(base + path, method=method, data=json.dumps(body).encode() if body else None,
                                 headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        return json.load(r)

def first_output(home, image):
    """Seconds from the create call to 'ready' in the machine's log."""
    t0 = time.perf_counter()
    m = api(home, "POST", "/v1/machines", {"config": {"image": image, "restart": {"policy": "no", "max_retries": 0},
                                                       "init": {"cmd": ["/bin/sh", "-c", "echo ready; sleep 1000"]}}})
    log = os.path.join(home, "machines", m["id"], "machine.log")
    while True:
        try:
            if b"ready" in open(log, "rb").read():
                return time.perf_counter() - t0, m["id"]
        except FileNotFoundError:
            pass
        time.sleep(0.0005)

def image_dir(work, n):
    d = os.path.join(work, f"img{n}")
    os.makedirs(os.path.join(d, "bin"), exist_ok=True)
    shutil.copy(shutil.which("busybox"), os.path.join(d, "bin", "busybox"))
    for a in ["sh", "echo", "sleep"]:
        os.symlink("busybox", os.path.join(d, "bin", a))
    open(os.path.join(d, "round"), "w").write(str(n))  # a new layer each round
    return d

def runc_bundle(work):
    b = os.path.join(work, "bundle")
    root = os.path.join(b, "rootfs")
    os.makedirs(os.path.join(root, "bin"))
    shutil.copy(shutil.which("busybox"), os.path.join(root, "bin", "busybox"))
    for a in ["sh", "echo", "sleep"]:
        os.symlink("busybox", os.path.join(root, "bin", a))
    subprocess.run(["runc", "spec"], cwd=b, check=True)
    cfg = json.load(open(os.path.join(b, "config.json")))
    cfg["process"]["terminal"] = False
    cfg["process"]["args"] = ["/bin/sh", "-c", "echo ready"]
    json.dump(cfg, open(os.path.join(b, "config.json"), "w"))
    return b

def runc_first_output(work, bundle, n):
    root = os.path.join(work, "runc-root")
    t0 = time.perf_counter()
    p = subprocess.Popen(["runc", "--root", root, "run", "--bundle", bundle, f"bench{n}"], stdout=subprocess.PIPE)
    p.stdout.readline()
    t = time.perf_counter() - t0
    p.wait()
    return t

def main():
    cmd, work = sys.argv[1], sys.argv[2]
    home = os.path.join(work, "home")
    if cmd == "cleanup":
        try:
            for m in api(home, "GET", "/v1/machines"):
                api(home, "DELETE", f"/v1/machines/{m['id']}?force=true")
        except Exception:
            pass
        return
    rounds, hangar = int(sys.argv[3]), sys.argv[4]
    first, second, runc = [], [], []
    bundle = runc_bundle(work)
    for n in range(rounds):
        ref = f"localhost/bench:{n}"
        subprocess.run([hangar, "image", "build", image_dir(work, n), "-t", ref], check=True, stdout=subprocess.DEVNULL)
        t, a = first_output(home, ref)
        first.append(t)
        t, b = first_output(home, ref)
        second.append(t)
        runc.append(runc_first_output(work, bundle, n))
        for mid in (a, b):
            api(home, "DELETE", f"/v1/machines/{mid}?force=true")
    ms = lambda xs: statistics.median(xs) * 1000
    print(f"(a) first machine of an image:   {ms(first):7.1f} ms median")
    print(f"(b) second machine, same image:  {ms(second):7.1f} ms median (goal <= 150 ms)")
    print(f"(c) runc run, prepared bundle:   {ms(runc):7.1f} ms median")
    print(f"(b)/(c) ratio: {ms(second) / ms(runc):.2f}x (goal <= 1.5x)")

main()
