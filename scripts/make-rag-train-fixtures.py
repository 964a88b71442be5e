#!/usr/bin/env python3
# Regenerates the reference fixtures of `lever rag train` (issue 21, items 5 and 7):
#
#   crates/lever-model/tests/fixtures/bert-grad/   a tiny random transformers BertModel
#       (config.json, model.safetensors) and reference.safetensors: token ids of a padded
#       batch, its sentence embeddings (mean pooling over the mask, then L2 normalization, as
#       sentence-transformers' Pooling + Normalize), and PyTorch autograd's gradient of
#       L = Σ w ⊙ e (w fixed, random) with respect to every weight, computed in float64.
#   crates/lever-model/tests/fixtures/embed/minilm-perturbed.json   sentence-transformers'
#       embeddings of a few sentences by all-MiniLM-L6-v2 with every weight moved by the
#       deterministic pattern `perturb` below (lever's test applies the same pattern, writes
#       the folder with `Encoder::write_folder` and compares).
#   crates/lever-train/tests/fixtures/rag_marginal.json   the RAG-Sequence and RAG-Token
#       negative marginal log-likelihoods (Lewis et al. 2020, §2.1) of random cases, with
#       PyTorch autograd's gradients with respect to the document scores and the logits.
#
# Venv: the reference venv (see scripts/make-hf-tiny-fixtures.py) with
#   /root/.cache/lever-ref-venv/bin/pip install transformers==4.57.6 sentence-transformers==5.7.0
# (made with torch 2.15.0). Run, offline, ~15 s on 2 cores:
#   /root/.cache/lever-ref-venv/bin/python scripts/make-rag-train-fixtures.py [MINILM_DIR]
import json
import os
import shutil
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOME = os.environ.get("LEVER_HOME", os.path.expanduser("~/.cache/lever"))
MINILM = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HOME, "models/all-minilm-l6-v2")
torch.set_num_threads(2)


def pooled(hidden, mask):
    # sentence-transformers Pooling (mean) + Normalize.
    m = mask.unsqueeze(-1).to(hidden.dtype)
    mean = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(mean, p=2, dim=1)


def bert_grad():
    from transformers import BertConfig, BertModel

    out = os.path.join(ROOT, "crates/lever-model/tests/fixtures/bert-grad")
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(21)
    cfg = BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=32,
        max_position_embeddings=24,
        type_vocab_size=2,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        # Wider than BERT's 0.02, so that attention is far from uniform and the queries' and
        # keys' gradients are not vanishingly small.
        initializer_range=0.3,
        attn_implementation="eager",
    )
    model = BertModel(cfg, add_pooling_layer=False).eval()
    # Biases and norms away from their 0/1 initialization, so the test sees them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.05)
            elif "LayerNorm.weight" in name:
                p.normal_(1.0, 0.1)
    cfg.save_pretrained(out)
    weights = {k: v.contiguous() for k, v in model.state_dict().items() if "position_ids" not in k}
    save_file(weights, os.path.join(out, "model.safetensors"))
    lens = [11, 4, 7]
    t = max(lens)
    g = torch.Generator().manual_seed(5)
    ids = torch.zeros(len(lens), t, dtype=torch.long)
    mask = torch.zeros(len(lens), t, dtype=torch.long)
    for b, n in enumerate(lens):
        ids[b, :n] = torch.randint(1, cfg.vocab_size, (n,), generator=g)
        mask[b, :n] = 1
    w = torch.randn(len(lens), cfg.hidden_size, generator=g)

    def run(m, dtype):
        m = m.to(dtype)
        m.zero_grad()
        e = pooled(m(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
        loss = (w.to(dtype) * e).sum()
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in m.named_parameters()}
        return e.detach(), loss.detach(), grads

    # The reference is computed in float64 from the float32 weights (exactly representable):
    # the truth lever's float32 is held to. PyTorch's own float32 error is printed beside it.
    e32, _, g32 = run(model, torch.float32)
    e, loss, grads = run(model, torch.float64)
    rel = max(
        float((g32[n].double() - grads[n]).abs().max() / max(1.0, float(grads[n].abs().max())))
        for n in grads
    )
    print(f"bert-grad: PyTorch float32 vs float64: embeddings {float((e32.double() - e).abs().max()):.2e}, gradients (relative) {rel:.2e}")
    ref = {
        "ids": ids.to(torch.int64),
        "lens": torch.tensor(lens, dtype=torch.int64),
        "w": w,
        "embeddings": e.float(),
        "loss": loss.float().reshape(1),
    }
    for name, gr in grads.items():
        ref["grad." + name] = gr.float().contiguous()
    save_file(ref, os.path.join(out, "reference.safetensors"))
    print(f"bert-grad: loss {loss.item():.6f}, {len(grads)} gradients")


def perturb(name_index, t):
    # w + 0.01·sin(0.37·i + k): i the element's flat index, k the tensor's index in key order.
    flat = t.reshape(-1).to(torch.float64)
    i = torch.arange(flat.numel(), dtype=torch.float64)
    return (flat + 0.01 * torch.sin(0.37 * i + name_index)).to(torch.float32).reshape(t.shape)


PERTURBED_SENTENCES = [
    "Which NFL team represented the AFC at Super Bowl 50?",
    "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy.",
    "what is the boiling point of water at sea level",
    "Retrieval-augmented generation marginalizes over retrieved passages.",
]


def minilm_perturbed():
    from sentence_transformers import SentenceTransformer

    weights = load_file(os.path.join(MINILM, "model.safetensors"))
    keys = sorted(k for k in weights if "position_ids" not in k and not k.startswith("pooler."))
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "minilm-perturbed")
        shutil.copytree(MINILM, folder)
        for k_index, k in enumerate(keys):
            weights[k] = perturb(k_index, weights[k])
        save_file(weights, os.path.join(folder, "model.safetensors"))
        st = SentenceTransformer(folder, device="cpu")
        emb = st.encode(PERTURBED_SENTENCES, convert_to_numpy=True, normalize_embeddings=False)
        base = SentenceTransformer(MINILM, device="cpu").encode(PERTURBED_SENTENCES)
    shift = float(abs(emb - base).max())
    out = os.path.join(ROOT, "crates/lever-model/tests/fixtures/embed/minilm-perturbed.json")
    with open(out, "w") as f:
        json.dump(
            {
                "pattern": "w + 0.01*sin(0.37*i + k), i flat index, k index of the key in sorted order (position_ids and pooler.* left out)",
                "keys": keys,
                "sentences": PERTURBED_SENTENCES,
                "embeddings": emb.tolist(),
                "max_shift_from_base": shift,
            },
            f,
        )
    print(f"minilm-perturbed: {len(keys)} tensors moved, embeddings moved by up to {shift:.4f}")


def marginal():
    g = torch.Generator().manual_seed(7)
    cases = []
    for k, n, v, scale in [(3, 4, 7, 1.0), (5, 2, 11, 3.0), (4, 6, 5, 8.0), (1, 3, 6, 1.0)]:
        scores = (torch.randn(k, generator=g) * scale).double()
        logits = (torch.randn(k, n, v, generator=g) * scale).double()
        targets = torch.randint(0, v, (n,), generator=g)
        case = {
            "k": k,
            "n": n,
            "v": v,
            "scores": scores.tolist(),
            "logits": logits.reshape(-1).tolist(),
            "targets": targets.tolist(),
        }
        for form in ["seq", "token"]:
            s = scores.clone().requires_grad_(True)
            z = logits.clone().requires_grad_(True)
            log_pz = torch.log_softmax(s, 0)  # (K,)
            lp = torch.log_softmax(z, -1).gather(-1, targets.view(1, n, 1).expand(k, n, 1))
            lp = lp.squeeze(-1)  # (K, N)
            if form == "seq":
                # −log Σ_z p(z|x) Π_i p(y_i|x,z,y<i)
                nll = -torch.logsumexp(log_pz + lp.sum(1), 0)
            else:
                # −Σ_i log Σ_z p(z|x) p(y_i|x,z,y<i)
                nll = -torch.logsumexp(log_pz.unsqueeze(1) + lp, 0).sum()
            nll.backward()
            case[form] = {
                "nll": nll.item(),
                "grad_scores": s.grad.tolist(),
                "grad_logits": z.grad.reshape(-1).tolist(),
            }
        cases.append(case)
    out = os.path.join(ROOT, "crates/lever-train/tests/fixtures/rag_marginal.json")
    with open(out, "w") as f:
        json.dump({"torch": torch.__version__, "cases": cases}, f)
    print(f"rag_marginal: {len(cases)} cases")


if __name__ == "__main__":
    bert_grad()
    marginal()
    minilm_perturbed()
