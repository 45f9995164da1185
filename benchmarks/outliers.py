"""Which representation finds planted outliers: the audit's neighbour distance in each layer of the demo's model.

Data: the first 1,000 Rotten Tomatoes training reviews (``turnover_hf.assets.rotten_tomatoes``) plus 20 planted
rows that are not movie reviews in English: 5 strings of random characters, 5 reviews in other languages, 5 pieces
of markup, code or scraping debris, 5 degenerate texts (numbers, one word repeated, placeholders). Model: the demo's
(MiniLM with bottleneck adapters in its top 3 layers, turn-over dropout) trained one epoch on the 1,000 reviews.

Score: ``turnover_hf.audit.knn_distances`` (mean cosine distance to the 10 nearest rows) of the hidden states of a
layer averaged over the text's tokens, for every layer: 0 (the input embeddings) to 3 (the last frozen pretrained
layer) and 4-6 (fine-tuned through the adapters), and for all layers at once (the mean of their cosine distances). Measured: AUC of the planted rows, how many of them are among the top
20, and how many rows pass the audit's fence (Q3 + 3 IQR) and how many of those are planted.

Run from the repository root (about a minute on one thread):

    PYTHONPATH=. python benchmarks/outliers.py

Results: ``benchmarks/results/outliers.{json,md}``.
"""

from __future__ import annotations

import json
import random
import string
import time
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, concatenate_datasets
from transformers import DataCollatorWithPadding, TrainingArguments

import turnover_hf as th
from turnover_hf.audit import far_out_fence, knn_distances
from turnover_hf.data import BATCH_KEY
from turnover_hf.demo import DemoSettings, build_model, tokenize
from turnover_hf.evaluation.metrics import roc_auc
from turnover_hf.files import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"
LAYERS = (0, 1, 2, 3, 4, 5, 6)

FOREIGN = [
    "Un film magnifique, porté par des acteurs formidables et une mise en scène d'une grande finesse.",
    "Ein langweiliger Film mit einer vorhersehbaren Handlung und schwachen Dialogen.",
    "Una película encantadora que combina humor y ternura sin caer en el sentimentalismo.",
    "Un film noioso, lento e privo di qualsiasi tensione drammatica.",
    "Een prachtige film met sterke acteerprestaties en een verrassend einde.",
]
DEBRIS = [
    "<div class=\"review-body\"><span>Read more</span></div>",
    "{\"rating\": 3, \"max\": 5, \"critic_id\": 10482}",
    "SELECT critic, score FROM reviews WHERE movie_id = 77;",
    "http://www.example.com/reviews/2004/07/index.html?page=3",
    "==== Page 3 of 12 ==== [Advertisement] ====",
]
DEGENERATE = ["1 2 3 4 5 6 7 8 9 10", "great great great great great great great great", "N/A", "TBD TBD TBD",
              "..........."]


def planted(seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    noise = ["".join(rng.choice(string.ascii_letters + string.digits + "  !?#") for _ in range(rng.randint(30, 80)))
             for _ in range(5)]
    return ([("random characters", t) for t in noise] + [("other language", t) for t in FOREIGN]
            + [("markup / debris", t) for t in DEBRIS] + [("degenerate", t) for t in DEGENERATE])


@torch.no_grad()
def pooled_layers(model: torch.nn.Module, rows: Dataset, collator, batch_size: int = 64) -> dict[int, torch.Tensor]:
    """Every layer's hidden states averaged over each row's tokens, in one forward pass per batch."""
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in LAYERS}
    model.eval()
    for start in range(0, len(rows), batch_size):
        batch = collator([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
        inputs = {k: v for k, v in batch.items() if k not in ("labels", BATCH_KEY)}
        states = model(**inputs, output_hidden_states=True).hidden_states
        mask = inputs["attention_mask"][..., None].float()
        for layer in LAYERS:
            out[layer].append((states[layer] * mask).sum(1) / mask.sum(1))
    return {layer: torch.cat(parts) for layer, parts in out.items()}


def main() -> None:
    started = time.perf_counter()
    settings = DemoSettings(n_train=1000, epochs=1.0)
    raw = th.assets.rotten_tomatoes(seed=0, n_train=settings.n_train, n_validation=8, n_test=8)
    odd = planted()
    extra = Dataset.from_dict({"text": [t for _, t in odd], "label": [0] * len(odd),
                               "example_id": [100_000 + k for k in range(len(odd))]}).cast(raw["train"].features)
    raw["train"] = concatenate_datasets([raw["train"], extra])
    is_planted = np.array([i >= 100_000 for i in raw["train"]["example_id"]])
    model, tokenizer = build_model(settings)
    data = tokenize(raw, tokenizer, settings.max_length)
    args = TrainingArguments(output_dir="/tmp/turnover-outliers-run", num_train_epochs=1,
                             per_device_train_batch_size=settings.batch_size, learning_rate=settings.learning_rate,
                             save_strategy="no", seed=0, use_cpu=True, report_to=[], disable_tqdm=True)
    th.TurnoverTrainer(model=model, args=args, data_collator=DataCollatorWithPadding(tokenizer),
                       train_dataset=data["train"]).train()
    collator = th.InstanceIdCollator(DataCollatorWithPadding(tokenizer))
    pooled = pooled_layers(model, data["train"], collator)
    rows = []
    kinds = [k for k, _ in odd]
    unit = {layer: torch.nn.functional.normalize(v, dim=1) for layer, v in pooled.items()}
    pooled["all layers"] = torch.cat([unit[layer] for layer in LAYERS], 1)  # cosine = mean of the layers' cosines
    for layer in (*LAYERS, "all layers"):
        scores = knn_distances(pooled[layer], 10)
        fence = far_out_fence(scores)
        order = np.argsort(-scores.numpy(), kind="stable")
        top = order[: int(is_planted.sum())]
        flagged = scores.numpy() > fence
        ranks = {k: [] for k in dict.fromkeys(kinds)}
        for n in np.flatnonzero(is_planted):
            ranks[kinds[n - (len(is_planted) - len(odd))]].append(int(np.flatnonzero(order == n)[0]) + 1)
        rows.append({"layer": layer, "auc": roc_auc(scores.numpy(), is_planted),
                     "planted_in_top": int(is_planted[top].sum()), "flagged": int(flagged.sum()),
                     "planted_flagged": int((flagged & is_planted).sum()),
                     "median_rank_by_kind": {k: float(np.median(v)) for k, v in ranks.items()}})
    results = {"n": len(is_planted), "planted": int(is_planted.sum()), "rows": rows,
               "seconds": time.perf_counter() - started}
    lines = ["# Planted outliers: which layer's neighbour distance finds them", "",
             "Command: `PYTHONPATH=. python benchmarks/outliers.py`. 1,000 Rotten Tomatoes reviews + 20 planted rows "
             "(5 each: random characters, other languages, markup / debris, degenerate), the demo's model trained one "
             "epoch; score = mean cosine distance to the 10 nearest rows.", "",
             "| layer | AUC | planted in the top 20 | rows past the fence (Q3 + 3 IQR) | planted among them | median rank: "
             + " / ".join(dict.fromkeys(kinds)) + " |", "|---|---|---|---|---|---|"]
    for r in rows:
        median = " / ".join(f"{v:g}" for v in r["median_rank_by_kind"].values())
        lines.append(f"| {r['layer']} | {r['auc']:.3f} | {r['planted_in_top']} | {r['flagged']} | "
                     f"{r['planted_flagged']} | {median} |")
    lines += ["", f"Total {results['seconds']:.0f} s on one thread.", ""]
    RESULTS.mkdir(exist_ok=True)
    atomic_write_text(RESULTS / "outliers.json", json.dumps(results, indent=1) + "\n")
    atomic_write_text(RESULTS / "outliers.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
