#!/usr/bin/env bash
# GPU check of the user path of VAR's CUDA graphs (issue 9): `ditstudio generate --cuda-graphs` on the shipped
# shapes-var-c2i gives the same images as without, same seed. Writes $OUT/var_graphs_check.json.
set -uo pipefail
source scripts/gpu/env.sh
python3 - <<'PY'
import json, os, time, torch
import app.generate as gen
out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
       "command": "bash scripts/gpu/var_graphs_check.sh"}
kw = dict(cfg=4.0, seed=3, num=8, device="cuda")
runs = {}
for graphs in (False, True, True):  # the second graphed call replays the recorded graphs
    t = time.perf_counter()
    res = gen.generate_var_images("shapes-var-c2i", [1, 5, 9], cuda_graphs=graphs, **kw)
    torch.cuda.synchronize()
    runs.setdefault(str(graphs), []).append((time.perf_counter() - t, [r[0].tobytes() for r in res]))
eager, g1, g2 = runs["False"][0], runs["True"][0], runs["True"][1]
out["images"] = len(eager[1])
out["graphed_equal_eager"] = sum(a == b for a, b in zip(eager[1], g1[1])) / len(eager[1])
out["replayed_equal_eager"] = sum(a == b for a, b in zip(eager[1], g2[1])) / len(eager[1])
out["seconds"] = {"eager": eager[0], "graphed_first_call_records": g1[0], "graphed_replay": g2[0]}
print(json.dumps(out, indent=2))
open(os.path.join(os.environ.get("OUT", "/tmp/out"), "var_graphs_check.json"), "w").write(json.dumps(out, indent=2))
PY
