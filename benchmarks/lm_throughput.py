"""Scoring throughput of turn-over influence on a small GPT-2 language model vs. its plain inference, in one run.

A 6-layer GPT-2 (n_embd 256, vocabulary 8,000, random weights: speed does not depend on them). Targets are
prompt + completion sequences of 64 tokens whose last 16 tokens count. For each place of the masks it prints the
scorer's (training id, target) pairs/s, the bound = plain batched inference of the same model at 2 forwards per
pair, their ratio, and the speed-up over the naive loop (one pair at a time, two forwards):

* masks on every Conv1D of every layer (batched path);
* PEFT LoRA (r = 16) on the attention and MLP output of every layer (batched path);
* PEFT LoRA on the top layer only (prefix reuse: the 5 lower layers run once per target);
* masks on the top layer's MLP only (prefix reuse);
and, for the top-layer LoRA, the same targets with every token counted (no trimming of the vocabulary projection).

Run:  python benchmarks/lm_throughput.py            (about 3-5 minutes on 2 CPU cores)
      python benchmarks/lm_throughput.py --quick    (a smoke run)
Results: benchmarks/results/lm_throughput.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import turnover_hf as th
from pipeline_throughput import (  # the same flags, timing and naive loop as for encoders
    add_scoring_arguments,
    naive_seconds_per_pair,
    timed,
)
from turnover_hf.files import atomic_write_text

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def gpt2(n_layer: int, n_embd: int, vocab: int) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab, n_embd=n_embd, n_layer=n_layer, n_head=4, n_positions=128,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


def peft_lora(model: GPT2LMHeadModel, layers=None):
    import peft

    config = peft.LoraConfig(r=16, lora_alpha=32, target_modules=["c_attn", "mlp.c_proj"], fan_in_fan_out=True,
                             layers_to_transform=layers, init_lora_weights=False)
    return peft.get_peft_model(model, config)


def targets(n: int, seq_len: int, completion: int, vocab: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seq_len), generator=g)
    labels = ids.clone()
    if completion:
        labels[:, : seq_len - completion] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def plain_sequences_per_second(model, seq_len: int, batch_size: int, vocab: int, repeats: int) -> float:
    """Plain inference: ``model(**batch)`` of batches of sequences, all logits, the full network, no cache."""
    batch = targets(batch_size, seq_len, 0, vocab, seed=7)
    feed = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}

    def run() -> None:
        with torch.no_grad(), th.instance_masks(model, mode="off"):
            model(**feed)

    return batch_size / timed(run, repeats)


def measure(name: str, model, config: th.TurnoverConfig, args, completion: int) -> dict:
    model = th.patch_model(model, config, warn_leaking=False).eval()
    batch = targets(args.targets, args.seq_len, completion, args.vocab)
    ids = torch.arange(args.ids)
    scorer = th.TurnoverScorer(model, batch_size=args.batch_size)
    scorer.scores(batch, batch["labels"], ids[:3])  # the first call checks the fast path against the definition
    seconds = timed(lambda: scorer.scores(batch, batch["labels"], ids), args.repeats)
    pairs_per_s = args.ids * args.targets / seconds
    bound = plain_sequences_per_second(model, args.seq_len, args.batch_size, args.vocab, args.repeats) / 2
    naive = 1 / naive_seconds_per_pair(model, batch, ids, args.naive_pairs)
    return {
        "setting": name, "path": scorer.path, "masked_modules": len(model.turnover_config.mask_sites),
        "counted_tokens": completion or args.seq_len - 1, "ids": args.ids, "targets": args.targets,
        "pairs_per_s": pairs_per_s, "bound_pairs_per_s": bound, "ratio_to_bound": pairs_per_s / bound,
        "naive_pairs_per_s": naive, "speedup_over_naive": pairs_per_s / naive,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--completion", type=int, default=16, help="counted tokens at the end of each target")
    parser.add_argument("--ids", type=int, default=64)
    parser.add_argument("--targets", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared machine)")
    add_scoring_arguments(parser, repeats=3, naive_pairs=16)
    args = parser.parse_args()
    if args.quick:
        args.layers, args.n_embd, args.vocab, args.ids, args.targets = 3, 64, 1000, 16, 2
        args.seq_len, args.completion, args.repeats, args.naive_pairs = 32, 8, 1, 4
    torch.set_num_threads(args.threads)
    top = args.layers - 1
    new = lambda: gpt2(args.layers, args.n_embd, args.vocab)  # noqa: E731
    rows = [
        measure("masks on every Conv1D, every layer", new(), th.TurnoverConfig(target_module_types=["Conv1D"]), args, args.completion),
        measure("PEFT LoRA, every layer", peft_lora(new()), th.TurnoverConfig(), args, args.completion),
        measure("PEFT LoRA, top layer", peft_lora(new(), [top]), th.TurnoverConfig(), args, args.completion),
        measure("masks on the top layer's MLP", new(), th.TurnoverConfig(target_modules=[f"transformer.h.{top}.mlp.c_fc"]), args, args.completion),
        measure("PEFT LoRA, top layer, every token counted", peft_lora(new(), [top]), th.TurnoverConfig(), args, 0),
    ]
    setup = {"torch": torch.__version__, "threads": torch.get_num_threads(), "layers": args.layers, "n_embd": args.n_embd,
             "vocab": args.vocab, "seq_len": args.seq_len, "batch_size": args.batch_size, "quick": args.quick}
    header = (f"GPT-2 {args.layers} layers x {args.n_embd}, vocabulary {args.vocab}, targets of {args.seq_len} tokens "
              f"({args.ids} ids x {args.targets} targets per call), torch {torch.__version__}, "
              f"{torch.get_num_threads()} thread(s), batch {args.batch_size}")
    lines = [
        f"# Scoring throughput on a small GPT-2 vs. its plain inference\n\n{header}. Bound = plain batched inference "
        "(`model(**batch)`, all logits, full network) at 2 forwards per pair, measured in the same run.\n",
        "| masks | path | counted tokens | pairs/s | bound pairs/s | ratio to bound | naive pairs/s | speed-up over naive |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['path']} | {r['counted_tokens']} | {r['pairs_per_s']:.1f} | "
                     f"{r['bound_pairs_per_s']:.1f} | {r['ratio_to_bound']:.2f} | {r['naive_pairs_per_s']:.1f} | "
                     f"{r['speedup_over_naive']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    name = "lm_throughput_quick" if args.quick else "lm_throughput"
    os.makedirs(RESULTS, exist_ok=True)
    atomic_write_text(os.path.join(RESULTS, f"{name}.json"), json.dumps({"setup": setup, "rows": rows}, indent=2) + "\n")
    atomic_write_text(os.path.join(RESULTS, f"{name}.md"), text)
    print(f"wrote {os.path.join(RESULTS, name)}.json and .md")


if __name__ == "__main__":
    main()
