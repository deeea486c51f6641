"""Runs inside the GPTQModel environment that benchmarks/gptqmodel_check.py makes (GPTQModel,
torch >= 2.14.1); it never imports quantkit.

    python _gptqmodel_worker.py logits CHECKPOINT WINDOWS.json OUT.npy
        GPTQModel.load(CHECKPOINT) on the CPU in float32; float16 logits of every window, concatenated
    python _gptqmodel_worker.py quantize SOURCE CALIBRATION.json OUT_DIR
        GPTQModel's own w4g128 GPTQ (symmetric, no act-order) of SOURCE on the given token windows
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))


def logits(checkpoint: str, windows_path: str, out: str) -> None:
    import numpy as np
    import torch
    from gptqmodel import GPTQModel

    windows = json.loads(open(windows_path, encoding="utf-8").read())
    # float32 like quantkit's GPTQ runtime (GPTQModel's CPU default is bfloat16: KLD 1.1e-3 from that alone)
    model = GPTQModel.load(checkpoint, device="cpu", dtype=torch.float32)
    kernel = sorted({type(m).__name__ for m in model.model.modules() if "Linear" in type(m).__name__ and type(m).__name__ != "Linear"})
    parts = []
    start = time.perf_counter()
    with torch.inference_mode():
        for window in windows:
            ids = torch.tensor([window], dtype=torch.long)
            parts.append(model.model(input_ids=ids).logits[0].float().numpy().astype(np.float16))
    np.save(out, np.concatenate(parts))
    print(json.dumps({"kernels": kernel, "seconds": time.perf_counter() - start}))


def quantize(source: str, calibration_path: str, out: str) -> None:
    from gptqmodel import GPTQConfig, GPTQModel

    windows = json.loads(open(calibration_path, encoding="utf-8").read())
    dataset = [{"input_ids": w, "attention_mask": [1] * len(w)} for w in windows]
    config = GPTQConfig(bits=4, group_size=128, sym=True, desc_act=False)
    model = GPTQModel.load(source, config, device="cpu")
    start = time.perf_counter()
    model.quantize(dataset, batch_size=1)
    model.save(out)
    print(json.dumps({"quantize_seconds": time.perf_counter() - start}))


if __name__ == "__main__":
    {"logits": logits, "quantize": quantize}[sys.argv[1]](*sys.argv[2:])
