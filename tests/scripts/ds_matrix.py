"""Many short DeepSpeed trainings in one process (run it under `accelerate launch` with a DeepSpeed config).

    ds_matrix.py SPEC.json OUT.json

SPEC lists runs: {"name", "config" (a YAML path), "stage" (ZeRO stage)}. Each is trained to its
train.max_steps minus one (a checkpoint), then resumed to train.max_steps, in this process: DeepSpeed
and Accelerate start once instead of once per run, which keeps the test matrix of families x ZeRO
stages inside the suite's time budget. OUT gets one record per run: what each of the two calls
returned or raised, and the run folder.
"""

import json
import os
import sys
import time
import traceback

from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from distgen.config import load_config
from distgen.errors import TrainingError
from distgen.train import train

# train() ends with Accelerator.end_training(), which destroys the process group; DeepSpeed keeps its
# groups built on it for the life of the process. Here the group stays for the next run.
Accelerator.end_training = lambda self: None
spec, out = json.load(open(sys.argv[1])), sys.argv[2]
results = []
for item in spec:
    os.environ["ACCELERATE_DEEPSPEED_ZERO_STAGE"] = str(item["stage"])  # read by each new DeepSpeedPlugin
    rec = {**item, "calls": []}
    for extra in (["train.max_steps=%d" % (item["steps"] - 1)], ["train.max_steps=%d" % item["steps"]]):
        # A fresh Accelerator state per run (the process group stays): the plugin picks up the stage above.
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
        t0 = time.time()
        try:
            rec["calls"].append({"rc": train(load_config(item["config"], extra)), "s": round(time.time() - t0, 1)})
        except TrainingError as e:
            rec["calls"].append({"error": str(e)})
            break
        except Exception:
            rec["calls"].append({"crash": traceback.format_exc()[-3000:]})
            break
    results.append(rec)
    print(f"ds_matrix: {item['name']} ZeRO-{item['stage']}: {rec['calls']}"[:300], flush=True)
json.dump(results, open(out, "w"), indent=1)
