"""A PEFT-LoRA causal LM, influence-ready: patch, train with TurnoverTrainer, save, reload, explain per token.

    python examples/peft_lora_causal_lm.py                                       # about 2-3 min on 2 CPU cores
    python examples/peft_lora_causal_lm.py --prompt "The acting is" --completion " superb and the script is sharp."
    python examples/peft_lora_causal_lm.py --n-train 100 --n-base 200 --base-epochs 1 --epochs 1   # a smoke run

Steps (all offline):
1. a base language model: a 3-layer GPT-2 trained plainly on one part of the Rotten Tomatoes snippets, with a BPE
   tokenizer trained here (a stand-in for a pretrained checkpoint), saved to <output-dir>/base;
2. LoRA on the top layer's attention with ``peft.get_peft_model``, patched with turn-over dropout (masks on the rank
   units), fine-tuned with ``TurnoverTrainer`` on other snippets;
3. ``model.save_pretrained``: PEFT's adapter files plus ``turnover_config.json``; reloaded with
   ``turnover_hf.load_influence_ready`` (identical masks and scores, checked here);
4. which training snippets helped or hurt each token of a prompt's completion, by the projected influence function
   (what ``estimator="auto"`` picks for a causal LM).
"""

import argparse
import os

import peft
import torch
from datasets import Dataset
from transformers import GPT2LMHeadModel, Trainer, TrainingArguments

import turnover_hf
from lm_common import sentences, small_gpt2, tokenized, train_tokenizer

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--n-train", type=int, default=1000, help="fine-tuning snippets (the ones explanations point to)")
parser.add_argument("--n-base", type=int, default=None, help="snippets for the base model (default: all the others)")
parser.add_argument("--base-epochs", type=float, default=6)
parser.add_argument("--epochs", type=float, default=3)
parser.add_argument("--prompt", default="The acting is")
parser.add_argument("--completion", default=" good, but the story is dull.")
parser.add_argument("--top-k", type=int, default=3)
parser.add_argument("--output-dir", default="out/peft_lora_lm")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
torch.manual_seed(args.seed)
cpu = not torch.cuda.is_available()


def run_args(name, epochs, lr):
    return TrainingArguments(os.path.join(args.output_dir, name), num_train_epochs=epochs, per_device_train_batch_size=32,
                             learning_rate=lr, lr_scheduler_type="cosine", warmup_ratio=0.05, save_strategy="no",
                             report_to=[], logging_strategy="epoch", use_cpu=cpu, seed=args.seed, disable_tqdm=True)


# 1. Base model: pretrained plainly on the snippets that are *not* in the fine-tuning set.
corpus = turnover_hf.assets.rotten_tomatoes(seed=args.seed, n_train=args.n_train)
base_texts = (list(corpus["validation"]["text"]) + list(corpus["test"]["text"]))[: args.n_base]
train = sentences(args.n_train, seed=args.seed)
tokenizer = train_tokenizer(base_texts + list(train["text"]))
base_dir = os.path.join(args.output_dir, "base")
base = small_gpt2(tokenizer, n_layer=3, n_embd=128, seed=args.seed)
base_data = tokenized(Dataset.from_dict({"text": base_texts}), tokenizer).remove_columns(["text"])
Trainer(model=base, args=run_args("base_run", args.base_epochs, 3e-3), train_dataset=base_data,
        data_collator=turnover_hf.CausalLMCollator(tokenizer)).train()
base.save_pretrained(base_dir)
tokenizer.save_pretrained(base_dir)

# 2. LoRA on the top layer, patched: one mask per snippet on the LoRA rank units. The lower layers carry no mask,
#    so scoring computes them once per target (prefix reuse).
base = GPT2LMHeadModel.from_pretrained(base_dir)  # adapter_config.json will name this folder as the base
lora = peft.LoraConfig(r=32, lora_alpha=64, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                       layers_to_transform=[base.config.n_layer - 1], task_type="CAUSAL_LM")
model = turnover_hf.patch_model(peft.get_peft_model(base, lora), turnover_hf.TurnoverConfig(seed=args.seed),
                                freeze_leaking=True)
print(f"masked LoRA modules: {list(model.turnover_config.mask_sites)}; leaking: {turnover_hf.leakage_report(model)}")

# 3. Fine-tune with TurnoverTrainer (each snippet's tokens all under that snippet's mask), save, reload.
train = tokenized(train, tokenizer)
turnover_hf.TurnoverTrainer(model=model, args=run_args("lora_run", args.epochs, 2e-3), train_dataset=train).train()
adapter_dir = os.path.join(args.output_dir, "adapter")
model.save_pretrained(adapter_dir)
tokenizer.save_pretrained(adapter_dir)
print(f"saved {sorted(os.listdir(adapter_dir))}")

reloaded = turnover_hf.load_influence_ready(adapter_dir)
assert reloaded.turnover_config.mask_sites == model.turnover_config.mask_sites
target = turnover_hf.CausalLMCollator(tokenizer)([turnover_hf.prompt_completion_features(tokenizer, args.prompt, args.completion)])
ids = torch.tensor(train["example_id"][:64])
same = torch.equal(turnover_hf.influence(model, target, ids), turnover_hf.influence(reloaded, target, ids))
print(f"reloaded from {adapter_dir}: identical masks, identical scores on 64 ids: {same}")

# 4. Explain the completion token by token with the estimator that measured closest to retraining for a causal LM:
#    estimator="auto" fits the projected influence function (per-token Gauss-Newton curvature in the LoRA matrices'
#    Kronecker eigenbasis; docs/method/quality.md). One model's turn-over scores are close to noise; they remain
#    available (estimator="turnover", forward passes only, the lower layers run once per target).
turnover = turnover_hf.InfluencePipeline(adapter_dir, train_dataset=train, batch_size=128, estimator="turnover")
print(f"turn-over scoring path: {turnover.scorer.path}")
pipe = turnover_hf.InfluencePipeline(adapter_dir, train_dataset=train, batch_size=128,
                                     options={"show_progress": False})
print(f"estimator: {pipe.estimator}")
result = pipe((args.prompt, args.completion), top_k=args.top_k)
tokens = result["tokens"]
width = max(7, *(len(repr(t)) for t in tokens))
print(f"\n{args.prompt!r} -> {args.completion!r}: influence on each completion token (> 0: the snippet helped)")
print(" " * 10 + "".join(f"{repr(t):>{width + 1}}" for t in tokens))
for title, people in (("helped most", result["proponents"]), ("hurt most", result["opponents"])):
    print(f"training snippets that {title} (mean over the completion):")
    for person in people:
        print(f"  {person['score']:+.4f}" + "".join(f"{v:+{width + 1}.3f}" for v in person["token_scores"]))
        print(f"      #{person['example_id']}: {person['text'][:100]}")
