#!/usr/bin/env python3
# Regenerates crates/lever-train/tests/fixtures/peft/gemma3-*: LoRA adapters both ways between
# lever and Hugging Face PEFT on the tiny Gemma 3 of
# crates/lever-model/tests/fixtures/hf-tiny/gemma3-f32 (3 layers, sliding window 5 on the local
# layers, q/k norms, GeGLU, its own attention scale), as scripts/make-peft-fixtures.py does for
# the tiny Llama:
#   gemma3-peft-made/  an adapter PEFT creates (random non-zero A and B, r=4, all 7 projections)
#                      + reference.json (PeftModel's logits for the fixture prompt), loss.json
#                      and grads.safetensors (the mean next-token loss's gradient for every
#                      lora_A / lora_B, through the windowed attention)
#   gemma3-lever-made/ an adapter `lever finetune` trains (3 steps on tinyshakespeare lines)
#                      + reference.json with PeftModel's logits for it
# lever's tests (crates/lever-train/tests/peft.rs) load each adapter and compare.
#
# Needs torch, transformers 4.57.6, peft 0.17.1 and safetensors in a venv:
#   /root/.cache/lever-ref-venv/bin/pip install torch transformers==4.57.6 peft==0.17.1 safetensors
# and a release build of lever (cargo build --release). Run from anywhere (~10 s):
#   /root/.cache/lever-ref-venv/bin/python scripts/make-gemma3-peft-fixtures.py
import json
import os
import shutil
import subprocess
import sys
import tempfile

import peft
import torch
import transformers
from safetensors.torch import save_file

if peft.__version__ != "0.17.1":
    print(f"warning: peft {peft.__version__} != pinned 0.17.1", file=sys.stderr)

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
BASE = os.path.join(ROOT, "crates", "lever-model", "tests", "fixtures", "hf-tiny", "gemma3-f32")
OUT = os.path.join(ROOT, "crates", "lever-train", "tests", "fixtures", "peft")
LEVER = os.path.join(ROOT, "target", "release", "lever")
DATA = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare", "input.txt")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

with open(os.path.join(BASE, "reference.json")) as f:
    input_ids = json.load(f)["input_ids"]


def base_model():
    # eager attention: the reference computation, sliding window included.
    return transformers.AutoModelForCausalLM.from_pretrained(
        BASE, torch_dtype=torch.float32, attn_implementation="eager")


def logits_with(adapter_dir):
    model = peft.PeftModel.from_pretrained(base_model(), adapter_dir)
    model.eval()
    with torch.no_grad():
        out = model(torch.tensor([input_ids])).logits[0]
    return out.tolist()


def write_reference(folder, logits, how):
    with open(os.path.join(folder, "reference.json"), "w") as f:
        json.dump({"made_by": how, "input_ids": input_ids, "logits": logits,
                   "peft": peft.__version__, "transformers": transformers.__version__}, f)
        f.write("\n")


for sub in ("gemma3-peft-made", "gemma3-lever-made"):
    shutil.rmtree(os.path.join(OUT, sub), ignore_errors=True)
os.makedirs(OUT, exist_ok=True)

# 1. PEFT makes an adapter; lever must run it and give PyTorch's gradients.
torch.manual_seed(0)
cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0,
                      init_lora_weights=False, task_type="CAUSAL_LM")
model = peft.get_peft_model(base_model(), cfg)
with torch.no_grad():  # B starts random with init_lora_weights=False; make it matter more
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.mul_(4.0)
made = os.path.join(OUT, "gemma3-peft-made")
model.save_pretrained(made, safe_serialization=True)
if os.path.exists(os.path.join(made, "README.md")):
    os.remove(os.path.join(made, "README.md"))
write_reference(made, logits_with(made),
                f"peft {peft.__version__} get_peft_model(init_lora_weights=False), B x4, seed 0")

model = peft.PeftModel.from_pretrained(base_model(), made, is_trainable=True)
ids = torch.tensor([input_ids])
logits = model(ids).logits[0]
loss = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:])
loss.backward()
grads = {}
for name, p in model.named_parameters():
    if p.grad is not None and "lora_" in name:
        grads[name.replace(".default", "")] = p.grad.detach().contiguous()
save_file(grads, os.path.join(made, "grads.safetensors"))
with open(os.path.join(made, "loss.json"), "w") as f:
    json.dump({"loss": loss.item()}, f)
    f.write("\n")

# 2. lever trains an adapter; PEFT must run it.
with tempfile.TemporaryDirectory() as tmp:
    with open(DATA) as f:
        lines = [l for l in f.read().split("\n\n")[:24] if l.strip()]
    data = os.path.join(tmp, "text.jsonl")
    with open(data, "w") as f:
        for l in lines:
            f.write(json.dumps({"text": l}) + "\n")
    run = os.path.join(tmp, "run")
    subprocess.run([LEVER, "finetune", "--model", BASE, "--data", data, "--lora", "--lora-r", "4",
                    "--lora-alpha", "8", "--steps", "3", "--batch-size", "4", "--seq-len", "64",
                    "--overlong", "truncate", "--lr", "0.05", "--warmup", "1", "--seed", "5",
                    "--out", run], check=True)
    lever_made = os.path.join(OUT, "gemma3-lever-made")
    shutil.copytree(os.path.join(run, "adapter"), lever_made)
write_reference(lever_made, logits_with(lever_made),
                "lever finetune --lora-r 4 --steps 3 --lr 0.05 --seed 5")
print("wrote", OUT)
