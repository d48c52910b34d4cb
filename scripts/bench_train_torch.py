"""PyTorch + PEFT side of scripts/bench-train: LoRA training throughput on the same GGUF model, rows, batch,
sequence lengths and LoRA settings as copilot-trainer, on the CPU.

    bench_train_torch.py MODEL.gguf ROWS.jsonl OUT.json --steps N --batch B --rank R --alpha A --dropout D \
        --targets q,k,v,o --threads T --lr LR

Transformers dequantizes the GGUF to float32 (its only way to train a GGUF model); PEFT puts LoRA on the named
projections. Each optimizer step runs B sequences one at a time (no padding, gradient accumulation), masks the
prompt tokens out of the loss (labels -100), and steps AdamW — the same work copilot-trainer does. The first step is
a warm-up and is not timed. Writes tokens/s and per-step times.
"""
import argparse, json, os, platform, sys, time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("rows")
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--targets", default="q,k,v,o")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--lr", type=float, default=2e-4)
    a = ap.parse_args()

    import torch
    import transformers
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(a.threads)
    torch.manual_seed(42)
    d, f = os.path.split(os.path.abspath(a.model))
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32)
    load_s = time.time() - t0
    names = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    cfg = peft.LoraConfig(
        r=a.rank,
        lora_alpha=a.alpha,
        lora_dropout=a.dropout,
        target_modules=[names[t] for t in a.targets.split(",")],
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(model, cfg)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr, weight_decay=0.0)

    rows = [json.loads(l) for l in open(a.rows) if l.strip()]
    need = (a.steps + 1) * a.batch
    if len(rows) < need:
        sys.exit(f"need {need} rows, {a.rows} has {len(rows)}")
    examples = []
    for r in rows[:need]:
        p = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        c = tok(r["completion"], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p + c])
        labels = torch.tensor([[-100] * len(p) + c])
        examples.append((ids, labels, len(c)))

    steps = []
    for s in range(a.steps + 1):
        batch = examples[s * a.batch:(s + 1) * a.batch]
        total = sum(n for _, _, n in batch)
        start = time.time()
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        tokens = 0
        for ids, labels, n in batch:
            out = model(input_ids=ids, labels=labels)
            # Transformers' loss is the mean over this sequence's completion tokens; weight by their share of the step.
            loss = out.loss * (n / total)
            loss.backward()
            loss_sum += loss.item()
            tokens += ids.shape[1]
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        steps.append({"step": s, "tokens": tokens, "seconds": time.time() - start, "loss": loss_sum})
        print(f"torch step {s}: {tokens} tokens, {steps[-1]['seconds']:.2f} s, loss {loss_sum:.4f}", flush=True)
    timed = steps[1:]
    tok_s = sum(x["tokens"] for x in timed) / sum(x["seconds"] for x in timed)
    json.dump(
        {
            "framework": f"PyTorch {torch.__version__} + PEFT {peft.__version__} + Transformers {transformers.__version__}",
            "dtype": "float32 (GGUF dequantized by Transformers)",
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "load_s": load_s,
            "trainable_parameters": trainable,
            "steps": steps,
            "tokens_per_s": tok_s,
            "peak_rss_bytes": peak_rss(),
        },
        open(a.out, "w"),
        indent=2,
    )


def peak_rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


if __name__ == "__main__":
    main()
