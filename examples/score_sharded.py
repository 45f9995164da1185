"""Self-influence of every training example, sharded over processes (CPU processes on gloo, or GPUs).

    torchrun --nproc_per_node 2 examples/score_sharded.py --model out/model --train out/train --output-dir scores
    accelerate launch --multi_gpu --num_processes 4 examples/score_sharded.py --model ... --train ... --output-dir ...
    torchrun --nproc_per_node 2 examples/score_sharded.py ... --estimator projected   # the fit is sharded too
Each process scores its share of the training ids (and, with --estimator projected, fits on its share of the
training batches: the curvature is summed over processes); chunks are saved under --output-dir, so an interrupted run
resumes where it stopped. The main process prints the most suspicious examples.
"""

import argparse

import torch
from accelerate import PartialState
from datasets import load_from_disk

import turnover_hf

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", required=True)
parser.add_argument("--train", required=True)
parser.add_argument("--output-dir", required=True)
parser.add_argument("--estimator", default="auto", help="auto, influence, projected, turnover, hydra")
args = parser.parse_args()

state = PartialState(cpu=not torch.cuda.is_available())  # several CPU processes talk over gloo
pipe = turnover_hf.InfluencePipeline(args.model, train_dataset=load_from_disk(args.train), device=state.device,
                                     estimator=args.estimator)
ranked = pipe.self_influence(output_dir=args.output_dir).sort("self_influence", reverse=True)
if state.is_main_process:
    print(f"{state.num_processes} process(es), estimator {pipe.estimator!r}; highest self-influence (memorised, often mislabelled):")
    for row in ranked.select(range(min(10, len(ranked)))):
        print(f"  {row['self_influence']:+.4f}  [{row['label']}] #{row['example_id']}: {row['text'][:100]}")
