#!/usr/bin/env python3
# The PyTorch reference side of bench/finetune-vs-pytorch.sh: fine-tunes the same GGUF model on
# the same data the way `lever finetune` does, with transformers (+ PEFT for LoRA) on the CPU,
# and writes its speed, per-step losses and peak RSS as JSON.
#
# What it mirrors from lever (crates/lever-data/src/sft.rs, crates/lever-train/src/trainer.rs):
#   - each line {question, answer} becomes [user: question, assistant: answer], rendered with the
#     model's chat template (no system prompt given, so SmolLM2's template adds its default one);
#     tokenized the way lever does it (context and assistant span encoded separately, no extra
#     BOS); only the assistant's span (content, <|im_end|>, newline) is a loss target;
#   - examples over --seq-len tokens are skipped; the kept ones are shuffled with lever's
#     SplitMix64 Fisher-Yates (seed) and the last round(5%) held out for validation (unused here);
#   - batches are drawn in lever's order (a SplitMix64 permutation seeded seed ^ 0x5eedda7a,
#     renewed each epoch), so step k sees the very examples lever's step k sees, right-padded to
#     the longest in the batch; loss = mean over the batch's trained tokens;
#   - AdamW (betas .9/.999, eps 1e-8, weight decay 0), global-norm clip 1.0, linear warmup then
#     cosine decay to a tenth of the peak learning rate.
# LoRA: PEFT r=8 alpha=16 dropout 0 on q,k,v,o,gate,up,down (not lm_head), on the dequantized f32
# base. Full: every parameter trainable (the embedding is tied to lm_head, so it counts once), f32.
# The base weights come from the GGUF through transformers' GGUF loader, which dequantizes to f32
# (needs the `gguf` package). model.train(); no torch.compile; gradient checkpointing only with
# --grad-checkpoint.
#
# Timing: every optimizer step (batch to tensors, zero_grad, forward, backward, clip, AdamW step,
# schedule step) is timed alone; tokens/s = non-padding tokens of steps 2..N / their seconds
# (step 1 is the warm-up and is left out, as bench/finetune-vs-pytorch.sh does for lever). Model
# loading and data preparation are outside. peak_rss_mb is this process's ru_maxrss (so it
# includes loading the model).
#
#   python bench/finetune_pytorch.py --gguf M.gguf --data D.jsonl --mode lora --steps 6 \
#       --batch-size 4 --seq-len 256 --threads 2 --seed 0 --json out.json
import argparse
import json
import math
import os
import resource
import sys
import time

MASK64 = (1 << 64) - 1


class SplitMix64:
    """lever_model::weights::SplitMix64, bit for bit."""

    def __init__(self, state):
        self.state = state & MASK64

    def next_u64(self):
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)


def shuffle(v, rng):
    for i in range(len(v) - 1, 0, -1):
        j = rng.next_u64() % (i + 1)
        v[i], v[j] = v[j], v[i]


def tokenize(tok, messages):
    """lever's sft::tokenize for a conversation: (ids, trained)."""
    ids, trained = [], []

    def enc(text):
        return tok(text, add_special_tokens=False)["input_ids"] if text else []

    done = ""
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tok.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
        after = tok.apply_chat_template(messages[: k + 1], tokenize=False, add_generation_prompt=False)
        assert before.startswith(done) and after.startswith(before), "template rewrites earlier turns"
        part = enc(before[len(done):])
        ids += part
        trained += [False] * len(part)
        part = enc(after[len(before):])
        ids += part
        trained += [True] * len(part)
        done = after
    rest = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)[len(done):]
    part = enc(rest)
    ids += part
    trained += [False] * len(part)
    return ids, trained


def prepare(tok, path, seq_len, val_fraction, seed):
    kept, skipped_long, skipped_untrained, read = [], 0, 0, 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            read += 1
            ex = json.loads(line)
            msgs = [{"role": "user", "content": ex["question"]},
                    {"role": "assistant", "content": ex["answer"]}]
            ids, trained = tokenize(tok, msgs)
            if len(ids) > seq_len:
                skipped_long += 1
                continue
            if not any(trained[1:]):
                skipped_untrained += 1
                continue
            kept.append((ids, trained))
    shuffle(kept, SplitMix64(seed))
    n_val = int(math.floor(len(kept) * val_fraction + 0.5))  # Rust's f64::round (half away from 0)
    if val_fraction > 0 and len(kept) >= 2:
        n_val = min(max(n_val, 1), len(kept) - 1)
    train, val = kept[: len(kept) - n_val], kept[len(kept) - n_val:]
    return train, val, {"read": read, "train": len(train), "validation": len(val),
                        "skipped_long": skipped_long, "skipped_untrained": skipped_untrained}


class BatchOrder:
    """lever's Trainer::next_batch."""

    def __init__(self, n, seed):
        self.n, self.rng, self.order, self.cursor = n, SplitMix64(seed ^ 0x5EEDDA7A), [], 0

    def next(self, b):
        out = []
        while len(out) < b:
            if self.cursor >= len(self.order):
                self.order = list(range(self.n))
                shuffle(self.order, self.rng)
                self.cursor = 0
            out.append(self.order[self.cursor])
            self.cursor += 1
        return out


def lr_at(step, peak, warmup, steps):
    """lever's TrainConfig::lr_at (0-based step)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    span = max(steps - warmup, 1)
    progress = min((step - warmup) / span, 1.0)
    lo = 0.1 * peak
    return lo + 0.5 * (peak - lo) * (1.0 + math.cos(math.pi * progress))


def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KB on Linux


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--mode", choices=["lora", "full"], required=True)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=None, help="peak lr (default 1e-3 lora, 1e-5 full)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--val-fraction", type=float, default=0.05)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--lora-alpha", type=float, default=16.0)
    ap.add_argument("--grad-checkpoint", action="store_true",
                    help="recompute each layer's activations in the backward pass")
    ap.add_argument("--json", required=True, help="where to write the result")
    a = ap.parse_args()
    lr = a.lr if a.lr is not None else (1e-3 if a.mode == "lora" else 1e-5)

    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)

    t_load = time.perf_counter()
    folder, name = os.path.split(os.path.abspath(a.gguf))
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.config.use_cache = False
    if a.mode == "lora":
        import peft

        cfg = peft.LoraConfig(r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=0.0, bias="none",
                              target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                              "gate_proj", "up_proj", "down_proj"],
                              task_type="CAUSAL_LM")
        model = peft.get_peft_model(model, cfg)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    if a.grad_checkpoint:
        # transformers' per-layer checkpointing; with frozen embeddings (LoRA) the checkpointed
        # inputs must require grad for the backward to reach the adapters.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if a.mode == "lora":
            model.enable_input_require_grads()
    elif getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    load_s = time.perf_counter() - t_load
    rss_after_load = rss_mb()

    t_data = time.perf_counter()
    train, _val, counts = prepare(tok, a.data, a.seq_len, a.val_fraction, a.seed)
    data_s = time.perf_counter() - t_data
    print(f"pytorch {a.mode}: {n_trainable} trainable parameters; data {counts}; "
          f"load {load_s:.1f}s, data {data_s:.1f}s", file=sys.stderr)

    opt = torch.optim.AdamW(params, lr=lr_at(0, lr, a.warmup, a.steps), betas=(0.9, 0.999),
                            eps=1e-8, weight_decay=0.0)
    order = BatchOrder(len(train), a.seed)
    pad_id = 0
    losses, step_tokens, step_trained, step_secs, grad_norms = [], [], [], [], []
    for step in range(a.steps):
        idx = order.next(a.batch_size)
        t0 = time.perf_counter()
        batch = [train[i] for i in idx]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        attn = torch.zeros((len(batch), width), dtype=torch.long)
        for r, (ids, trained) in enumerate(batch):
            n = len(ids)
            input_ids[r, :n] = torch.tensor(ids)
            attn[r, :n] = 1
            labels[r, :n] = torch.tensor([t if m else -100 for t, m in zip(ids, trained)])
        for g in opt.param_groups:
            g["lr"] = lr_at(step, lr, a.warmup, a.steps)
        opt.zero_grad(set_to_none=True)
        # HF shifts labels inside: position i predicts token i+1; the mean is over labels != -100
        # of the whole batch, i.e. over every trained token, as lever's loss.
        out = model(input_ids=input_ids, attention_mask=attn, labels=labels)
        out.loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, a.grad_clip) if a.grad_clip > 0 else torch.tensor(0.0)
        opt.step()
        dt = time.perf_counter() - t0
        n_tok = sum(len(ids) for ids, _ in batch)
        losses.append(float(out.loss.detach()))
        grad_norms.append(float(gn))
        step_tokens.append(n_tok)
        step_trained.append(sum(sum(t[1:]) for _, t in batch))
        step_secs.append(dt)
        print(f"step {step + 1}: loss {losses[-1]:.4f} lr {lr_at(step, lr, a.warmup, a.steps):.2e} "
              f"grad_norm {grad_norms[-1]:.3f} tokens {n_tok} {n_tok / dt:.0f} tok/s", file=sys.stderr)

    skip = 1 if a.steps > 1 else 0
    tokens, seconds = sum(step_tokens[skip:]), sum(step_secs[skip:])
    result = {
        "mode": a.mode, "steps": a.steps, "batch_size": a.batch_size, "seq_len": a.seq_len,
        "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
        "losses": losses, "peak_rss_mb": rss_mb(),
        "timed_steps": f"{skip + 1}..{a.steps}",
        "threads": a.threads, "lr": lr, "warmup": a.warmup, "seed": a.seed,
        "trainable_parameters": n_trainable, "grad_norms": grad_norms,
        "step_tokens": step_tokens, "step_trained_tokens": step_trained, "step_seconds": step_secs,
        "rss_after_load_mb": rss_after_load, "load_seconds": load_s, "data_seconds": data_s,
        "examples": counts,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     **({"peft": __import__("peft").__version__} if a.mode == "lora" else {})},
    }
    with open(a.json, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(f"pytorch {a.mode}: {result['tokens_per_s']:.1f} tok/s (steps {result['timed_steps']}), "
          f"peak RSS {result['peak_rss_mb']:.0f} MB", file=sys.stderr)


if __name__ == "__main__":
    main()
