#!/usr/bin/env python3
# Regenerates crates/lever-train/tests/fixtures/adamw.json: torch.optim.AdamW on a 2x3 and a 4
# parameter tensor over 6 steps with fixed gradients (lr 0.01, weight decay 0.1, betas
# (0.9, 0.999), eps 1e-8), recording the parameters after every step. lever's AdamW
# (crates/lever-train/src/optim.rs) must follow it (crates/lever-train/tests/adamw.rs).
# Venv: see scripts/make-hf-tiny-fixtures.py. Run: /root/.cache/lever-ref-venv/bin/python scripts/make-adamw-fixture.py
import json
import os

import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
OUT = os.path.join(ROOT, "crates", "lever-train", "tests", "fixtures", "adamw.json")

g = torch.Generator().manual_seed(0)
params = [torch.randn(2, 3, generator=g), torch.randn(4, generator=g)]
init = [p.tolist() for p in params]
params = [torch.nn.Parameter(p.clone()) for p in params]
opt = torch.optim.AdamW(params, lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
grads, after = [], []
for step in range(6):
    gs = [torch.randn(p.shape, generator=g) * (0.1 if step % 2 else 2.0) for p in params]
    for p, gr in zip(params, gs):
        p.grad = gr.clone()
    opt.step()
    grads.append([x.tolist() for x in gs])
    after.append([p.detach().tolist() for p in params])
with open(OUT, "w") as f:
    json.dump({"torch": torch.__version__, "lr": 0.01, "betas": [0.9, 0.999], "eps": 1e-8,
               "weight_decay": 0.1, "init": init, "grads": grads, "after": after}, f)
    f.write("\n")
print("wrote", OUT)
