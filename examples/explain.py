"""Load an influence-ready checkpoint and explain one prediction with the training examples behind it.

    python examples/explain.py --model out/model --train out/train --text "a gripping, beautifully shot film"
"""

import argparse

from datasets import load_from_disk

import turnover_hf

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", required=True, help="influence-ready checkpoint folder (with its tokenizer)")
parser.add_argument("--train", required=True, help="the training set saved with datasets' save_to_disk")
parser.add_argument("--text", required=True)
parser.add_argument("--top-k", type=int, default=5)
args = parser.parse_args()

pipe = turnover_hf.InfluencePipeline(args.model, train_dataset=load_from_disk(args.train))
result = pipe(args.text, top_k=args.top_k)
print(f"label {result['label']} ({result['label_source']})")
for title, rows in (("helped", result["proponents"]), ("hurt", result["opponents"])):
    print(f"\ntraining examples that {title} most:")
    for row in rows:
        print(f"  {row['score']:+.4f}  [{row['label']}] #{row['example_id']}: {row['text'][:100]}")
