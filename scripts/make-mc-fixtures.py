"""Reference log-likelihoods for lever's multiple-choice evaluation (crates/lever-eval/tests/mc_reference.rs).

Loads the default model from its GGUF with transformers (dequantized to f32) and scores every
item of crates/lever-eval/tests/fixtures/mc_items.jsonl the way lm-evaluation-harness scores a
`multiple_choice` task with its Hugging Face backend:
- tokenization: no special tokens (lm-eval's HF backend passes add_special_tokens=False for
  causal models unless add_bos_token is set; the GGUF-built HF tokenizer would add BOS, which
  SmolLM2's GGUF metadata and llama.cpp do not); `TemplateLM._encode_pair` (lm_eval/api/model.py): trailing whitespace of the
  context moves to the continuation; continuation ids = encode(context + continuation) beyond
  len(encode(context)); an empty context becomes [prefix token] (BOS, else EOS) and the
  continuation is encoded alone (`TemplateLM.loglikelihood`);
- log-likelihood: sum of log_softmax(logits) at the continuation tokens, the model reading
  context + continuation[:-1]; is_greedy: every continuation token is the argmax
  (`HFLM._loglikelihood_tokens`, lm_eval/models/huggingface.py);
- acc / acc_norm: argmax of ll, and of ll / len(choice) in characters
  (`ConfigurableTask.process_results`, lm_eval/api/task.py).
This is a re-statement of those rules, written for lever; no lm-eval code is copied.

    python scripts/make-mc-fixtures.py GGUF ITEMS.jsonl OUT.json
"""

import json
import os
import sys

import numpy as np
import torch
import transformers


def encode_pair(tok, context, continuation):
    if context == "":
        prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        return [prefix], tok.encode(continuation, add_special_tokens=False)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok.encode(context + continuation, add_special_tokens=False)
    ctx = tok.encode(context, add_special_tokens=False)
    return ctx, whole[len(ctx):]


def main():
    gguf, items_path, out_path = sys.argv[1:4]
    folder, name = os.path.split(os.path.abspath(gguf))
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    items = [json.loads(l) for l in open(items_path, encoding="utf-8") if l.strip()]
    out_items = []
    acc = []
    acc_norm = []
    for it in items:
        lls = []
        rows = []
        ctx_ids = None
        for choice in it["choices"]:
            ctx, cont = encode_pair(tok, it["query"], choice)
            ctx_ids = ctx
            inp = torch.tensor([ctx + cont[:-1]])
            with torch.no_grad():
                logits = model(inp).logits[0, -len(cont):].float()  # (n, V)
            logp = torch.log_softmax(logits, dim=-1)
            target = torch.tensor(cont)
            per_token = logp.gather(1, target[:, None])[:, 0]
            greedy = bool((logits.argmax(dim=-1) == target).all())
            ll = float(per_token.double().sum())
            lls.append(ll)
            rows.append({"cont_ids": cont, "loglikelihood": ll, "is_greedy": greedy,
                         "token_logprobs": [float(x) for x in per_token]})
        lls = np.array(lls)
        lens = np.array([float(len(c)) for c in it["choices"]])
        pred = int(np.argmax(lls))
        pred_norm = int(np.argmax(lls / lens))
        acc.append(float(pred == it["gold"]))
        acc_norm.append(float(pred_norm == it["gold"]))
        out_items.append({"ctx_ids": ctx_ids, "choices": rows, "pred": pred, "pred_norm": pred_norm,
                          "gold": it["gold"]})
    out = {
        "about": "scripts/make-mc-fixtures.py: transformers log-likelihoods of mc_items.jsonl, lm-eval rules",
        "model": name,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "acc": float(np.mean(acc)),
        "acc_norm": float(np.mean(acc_norm)),
        "n": len(items),
        "items": out_items,
    }
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"{out_path}: {len(items)} items, acc {out['acc']:.4f}, acc_norm {out['acc_norm']:.4f}")


if __name__ == "__main__":
    main()
