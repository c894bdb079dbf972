"""Many short trainings in one launch (run it under `accelerate launch`, any number of processes and engine).

    train_matrix.py SPEC.json OUT.json

SPEC lists runs: {"name", "calls": [{"config": YAML path, "overrides": [...], "env": {...}}, ...]}. Each call is
one `distgen train` of that config, in this process: Accelerate, DeepSpeed and the process group start once
instead of once per call (what keeps the suite's matrices of families x engines x stages within its time). A
run's calls stop at the first that fails. OUT gets, per run, each call's return code, or its distgen error, or
its crash (traceback), and its seconds.
"""

import faulthandler
import gc
import json
import os
import sys
import time
import traceback

from distgen import dist
from distgen.config import load_config
from distgen.errors import ERRORS
from distgen.train import train

# A native crash (a malloc abort was seen once in the FSDP2 matrix, and not again in 17 reruns) prints every
# thread's Python stack, naming the run and the call that died.
faulthandler.enable(all_threads=True)
spec, out = json.load(open(sys.argv[1])), sys.argv[2]
results = []
for item in spec:
    rec = {"name": item["name"], "calls": []}
    for call in item["calls"]:
        os.environ.update(call.get("env", {}))  # e.g. ACCELERATE_DEEPSPEED_ZERO_STAGE, read by each run's engine
        # Objects of the runs before are done with: out of the collector's way, since DeepSpeed's ZeRO-3 calls
        # gc.collect() at each parameter release, and each walk of this long-lived process took ~0.4 s.
        gc.collect()
        gc.freeze()
        t0 = time.time()
        try:
            rec["calls"].append({"rc": train(load_config(call["config"], call.get("overrides", []))),
                                 "s": round(time.time() - t0, 1)})
        except ERRORS as e:
            rec["calls"].append({"error": str(e), "s": round(time.time() - t0, 1)})
            break
        except Exception:
            rec["calls"].append({"crash": traceback.format_exc()[-3000:]})
            break
    results.append(rec)
    print(f"train_matrix: {item['name']}: {rec['calls']}"[:300], flush=True)
rank = int(os.environ.get("RANK", "0"))
with open(out if rank == 0 else f"{out}.rank{rank}", "w") as f:
    json.dump(results, f, indent=1)
dist.end_rank(0)  # as `python -m distgen` ends a rank: no interpreter teardown, which was seen to abort one
