"""Fine-tune a Llama-family model with tensor parallelism, save it, then serve what it saved.

    torchrun --standalone --nproc-per-node 2 examples/finetune_tp.py --out /tmp/tuned
    tpserve generate --model /tmp/tuned --tp 2 "The capital of France is"

Each rank loads only its shard of tpserve's own model (which splits any head count, SmolLM2's
9 heads at TP=2 included), and the rest is a plain PyTorch loop: AdamW works on the shards
unchanged; only gradient clipping must know the cut (``tpserve.parallel.clip_grad_norm_``:
torch's sees one rank's shards). ``save_checkpoint`` writes a tpserve checkpoint that ``LLM`` /
``tpserve`` load at any TP degree. A ``parallelize()``d transformers model trains the same way
(README, Training) where TP divides its head counts.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers

from tpserve import load_model, save_checkpoint
from tpserve.parallel import broadcast_object, clip_grad_norm_, group_rank, init_distributed, manual_seed

TEXT = [
    "The capital of France is Paris, a city on the Seine.",
    "The capital of Germany is Berlin, a city on the Spree.",
    "The capital of Italy is Rome, a city on the Tiber.",
    "The capital of Austria is Vienna, a city on the Danube.",
]


def batch(model, tokenizer) -> tuple[torch.Tensor, object, torch.Tensor]:
    """The lines flattened into one row of tokens, as tpserve's model takes them (no padding):
    each line attends only to itself, and each token's target is the next one of its line."""
    lines = [tokenizer(t)["input_ids"] for t in TEXT]
    ids = torch.tensor([i for line in lines for i in line])
    step = model.make_step([p for line in lines for p in range(len(line))],
                           chunks=[(len(line), len(line), None) for line in lines])
    targets = torch.tensor([t for line in lines for t in line[1:] + [-100]])
    return ids, step, targets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="transformers directory (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--out", required=True, help="directory for the tpserve checkpoint")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args()

    group = init_distributed()  # gloo on CPU, NCCL on CUDA; torchrun sets RANK, WORLD_SIZE, ...
    rank = group_rank(group)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    path = args.model
    if path is None:  # rank 0 unpacks the embedded model once, the others wait for its path
        from tpserve.checkpoint.default_model import default_model_path

        path = broadcast_object(str(default_model_path()) if rank == 0 else None, 0, group)

    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = load_model(path, dtype="float32", group=group, progress=rank == 0)  # this rank's shard only
    model.train().requires_grad_(True)
    manual_seed(args.seed, group)  # dropout, if any: replicated regions alike on every rank, shards apart
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    ids, step_info, targets = batch(model, tokenizer)

    for step in range(args.steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(ids, step_info), targets, ignore_index=-100)
        loss.backward()
        norm = clip_grad_norm_(model, 1.0)
        opt.step()
        if rank == 0:
            print(f"step {step} grad_norm {norm.item():.3f} loss {loss.item():.4f}", flush=True)

    out = save_checkpoint(model, args.out, overwrite=args.overwrite)
    if rank == 0:
        print(f"saved {out}; serve it with: tpserve generate --model {out} \"The capital of France is\"")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
