"""The peer of bench/arena.sh's rating fit: choix (PyPI), fitting the same
games with its MM and ILSR algorithms. Prints JSON: each fit's median time
of 3 and the correlation of its log-strengths with Hangar's."""
import json
import sys
import time

import choix
import numpy as np

data = json.load(open(sys.argv[1]))
ours = np.array(json.loads(sys.argv[2])["strengths"])
n, pairs = data["players"], [tuple(p) for p in data["pairs"]]
out = {}
for name, fit in [("mm", choix.mm_pairwise), ("ilsr", choix.ilsr_pairwise)]:
    times = []
    for _ in range(3):
        t = time.perf_counter()
        params = fit(n, pairs, alpha=0.01)
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    out[name] = {"ms": times[1], "corr": float(np.corrcoef(ours, params)[0, 1])}
print(json.dumps(out))
