"""Issue 15: does the redesigned implant give a finished run's weights? Re-runs the run's saved config on
its parent (same data, same seed) and compares every tensor with the saved model; no evaluation, so no
test-set look. Run it with the thread count of the original run (floating-point order depends on it):

    OMP_NUM_THREADS=1 python benchmarks/replay_weights.py runs/cpu/implant-default
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from cambackdoor.checkpoints import load_model, read_sidecar
from cambackdoor.cli import default_data
from cambackdoor.data import load_cifar10
from cambackdoor.implant import implant
from cambackdoor.recipes import ImplantConfig


def main(run: Path) -> int:
    record = json.loads((run / "implant.json").read_text())
    cfg = ImplantConfig.from_saved(record["config"])
    meta = read_sidecar(run / "model")
    parent, _ = load_model(meta["parent"]["path"])
    data = load_cifar10(default_data(), progress=False)
    if data.fingerprint != record["data_fingerprint"]:
        print(f"data fingerprint {data.fingerprint[:12]} is not the run's {record['data_fingerprint'][:12]}")
        return 1
    t0 = time.perf_counter()
    model, _ = implant(parent, data, cfg, progress=False, device="cpu")
    saved, _ = load_model(run / "model")
    diffs = {name: (a.double() - b.double()).abs().max().item()
             for (name, a), b in zip(model.state_dict().items(), saved.state_dict().values())}
    worst = max(diffs, key=diffs.get)
    result = {"run": str(run), "threads": torch.get_num_threads(), "train_s": round(time.perf_counter() - t0, 1),
              "bit_identical": all(v == 0 for v in diffs.values()), "max_abs_diff": diffs[worst], "worst": worst}
    print(json.dumps(result))
    (run / "replay-weights.json").write_text(json.dumps(result, indent=1))
    return 0 if result["bit_identical"] else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/cpu/implant-default")))
