#!/usr/bin/env python3
"""PyTorch/transformers reference for `fedmicse bench`: the same measurements, same data.

    python3 bench/pytorch_reference.py [--model models/all-MiniLM-L6-v2] [--threads 2]

Needs `pip install torch transformers` (not a fedmicse dependency). Prints a table like
`fedmicse bench`: inference sentences/s at batch 64, max length 32 and 128 (STS-B test
sentences, sorted by length as fedmicse does unless --unsorted, padded to each batch's
longest), and a SimCSE training step
(batch 64 wiki sentences encoded twice with dropout, [CLS] + MLP head, InfoNCE at
temperature 0.05, AdamW) in sentences/s, with the process's peak RSS.
"""
import argparse
import resource
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer


def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sts_sentences(path, n):
    out = []
    with open(path, encoding="utf-8") as f:
        next(f)
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 3:
                out.extend(parts[1:3])
    return out[:n]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/all-MiniLM-L6-v2")
    ap.add_argument("--sentences", default="data/sts/stsb/test.tsv")
    ap.add_argument("--train-sentences", default="data/wiki/wiki_sentences.txt")
    ap.add_argument("--inference-sentences", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--inference-batch-size", type=int, default=None,
                    help="sentences per inference batch (default: --batch-size)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train-steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the GPU rows of BENCHMARKS.md)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"],
                    help="GPU matmul precision: fp32, TF32 tensor cores, or bf16 autocast")
    ap.add_argument("--unsorted", action="store_true",
                    help="keep the file's order (more padding) instead of sorting by length "
                         "as fedmicse does")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModel.from_pretrained(args.model, attn_implementation="eager")
    device = torch.device(args.device)
    model.to(device)
    torch.backends.cuda.matmul.allow_tf32 = args.precision == "tf32"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=args.precision == "bf16")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    rows = []

    sents = sts_sentences(args.sentences, args.inference_sentences)
    if not args.unsorted:
        sents.sort(key=len)
    model.eval()
    ib = args.inference_batch_size or args.batch_size
    for max_len in (32, 128):
        def run():
            with torch.inference_mode(), autocast:
                for i in range(0, len(sents), ib):
                    b = tok(sents[i:i + ib], padding=True, truncation=True,
                            max_length=max_len, return_tensors="pt").to(device)
                    model(**b).last_hidden_state[:, 0]
            sync()
        run()
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
        rows.append((f"inference, batch {ib}, max_len {max_len}", len(sents) / statistics.median(times),
                     "sentences/s"))

    with open(args.train_sentences, encoding="utf-8") as f:
        wiki = [l.strip() for l in f if l.strip()]
    hidden = model.config.hidden_size
    head = torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.Tanh()).to(device)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    model.train()
    b = args.batch_size

    def step(i):
        batch = wiki[(i * b) % len(wiki):(i * b) % len(wiki) + b]
        enc = tok(batch + batch, padding=True, truncation=True, max_length=32,
                  return_tensors="pt").to(device)
        with autocast:
            out = model(**enc, output_attentions=True)
            z = head(out.last_hidden_state[:, 0])
            z1, z2 = z[:b], z[b:]
            sim = F.cosine_similarity(z1.unsqueeze(1), z2.unsqueeze(0), dim=-1) / 0.05
            loss = F.cross_entropy(sim.float(), torch.arange(b, device=device))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    step(0)
    sync()
    times = []
    for r in range(args.repeats):
        t = time.perf_counter()
        for s in range(args.train_steps):
            step(1 + r * args.train_steps + s)
        sync()
        times.append((time.perf_counter() - t) / args.train_steps)
    per_step = statistics.median(times)
    rows.append(("SimCSE training step, max_len 32", b / per_step, "sentences/s"))
    rows.append(("SimCSE training step time", per_step, "s/step"))

    print(f"pytorch {torch.__version__}, transformers, {args.device} {args.precision}, "
          f"{args.threads} threads, batch {b}")
    print("| measurement | value | unit |\n|---|---:|---|")
    for name, value, unit in rows:
        print(f"| {name} | {value:.2f} | {unit} |")
    print(f"peak RSS {peak_mib():.0f} MiB")


if __name__ == "__main__":
    main()
