"""The influence function's fitting pass over the training set: per-example gradients of every kept class
(materialised), or the tracked Linear layers' inputs and output gradients (factorised), under each example's
training mask. A mixin of :class:`~turnover_hf.estimators.influence.scorer.InfluenceFunctionScorer`, which
supplies the model, the tracked parameters and the options."""

from __future__ import annotations

from typing import Any, ContextManager, Iterable, Iterator, Mapping, Optional, Union

import torch
from datasets import Dataset
from tqdm.auto import tqdm

from ...context import instance_masks
from ...data import check_ids_known
from ...errors import TurnoverError
from ...losses import eval_mode, find_labels, logits_of, model_inputs
from ..gradients import batch_ids, linear_calls
from .budget import check_factorised_budget, check_materialised_budget, factorised_gb
from .curvature import curvature_blocks, kept_classes
from .factorised import FactorisedFit, NotFactorisable, layer_inputs, one_row_each, output_gradients
from .materialised import MaterialisedFit, solve_system

TrainData = Union[Dataset, Iterable[Mapping[str, Any]]]


def check_classifier_logits(logits: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise TurnoverError(
            f"the influence estimator covers classifiers with logits of shape (batch, classes >= 2); this model gave "
            f"{tuple(logits.shape)}. For language models use the projected influence function (estimator='projected', "
            "what estimator='auto' picks for them)."
        )


def _class_labels(batch: Mapping[str, Any]) -> torch.Tensor:
    labels = find_labels(batch)
    if labels is not None:
        if labels.dim() != 1 or labels.is_floating_point():
            raise TurnoverError(
                f"the influence estimator needs one integer class label per training example, got labels of shape "
                f"{tuple(labels.shape)} and dtype {labels.dtype}."
            )
        return labels.long()
    raise TurnoverError("every training batch needs its labels (a 'labels' or 'label' entry) to fit influence functions.")



class FitPass:
    """Fitting of an influence-function scorer (see the module docstring)."""

    def _training_batches(self, data: TrainData) -> Iterator[tuple[Mapping[str, Any], torch.Tensor, torch.Tensor, Optional[int]]]:
        """``(batch, example ids, labels, N if known)`` of every training batch, with a progress bar."""
        batches, expected, total = self._batches(data)
        for batch in tqdm(batches, total=total, desc="influence function: training gradients", unit="batch",
                          disable=not self.show_progress):
            yield batch, batch_ids(batch), _class_labels(batch), expected

    def _fit_materialised(self, data: TrainData) -> MaterialisedFit:
        """Per-example gradients of every kept class (``N (C - 1) x D'``), then the factor."""
        ids, labels, probs, classes, grads = [], [], [], [], []
        stored: Optional[torch.Tensor] = None  # (N, C-1, D') filled batch by batch when N is known (no second copy)
        trace, seen = 0.0, 0
        for batch, batch_ids, batch_labels, expected in self._training_batches(data):
            inputs = model_inputs(batch, self.device)
            probabilities: list[torch.Tensor] = []  # under the training masks, from the forward that serves the grads

            def kept_of(logits: torch.Tensor) -> torch.Tensor:
                check_classifier_logits(logits)
                probabilities.append(torch.softmax(logits.double(), -1).cpu())
                if seen == 0:
                    check_materialised_budget(expected or len(logits), logits.shape[1] - 1, self.width, self.solver, self.max_memory_gb)
                return kept_classes(probabilities[-1]).to(logits.device)

            def row_context(k: int, ids: torch.Tensor = batch_ids) -> ContextManager:
                return instance_masks(self.model, ids[k : k + 1], mode="train")

            # one forward and a backward per kept class when the tracked Linears allow it; else a forward for the
            # probabilities, then every (example, kept class) as a row of its own
            both = self.grads.pseudo_label_gradients(inputs, kept_of, row_context if self.patched else None,
                                                     self._training_masks(batch_ids) if self.patched else None)
            if both is not None:
                g = both[1]
            else:
                with torch.no_grad(), eval_mode(self.model), self._training_masks(batch_ids):
                    pseudo_labels = kept_of(logits_of(self.model(**inputs)))
                per = pseudo_labels.shape[1]
                repeated = {k: v.repeat_interleave(per, 0) for k, v in inputs.items()}
                masks = self._training_masks(batch_ids.repeat_interleave(per)) if self.patched else None
                g = self.grads(repeated, pseudo_labels.reshape(-1),
                               (lambda k: row_context(k // per)) if self.patched else None, masks)
            p = probabilities[-1]
            kept = kept_classes(p)
            n, c = p.shape
            seen += n
            check_materialised_budget(seen, c - 1, self.width, self.solver, self.max_memory_gb)
            g = g.view(n, c - 1, -1)
            gram = torch.einsum("ncd,ned->nce", g.double(), g.double()).cpu()
            trace += float((curvature_blocks(p, kept) * gram).sum())
            if self.sketch is not None:
                g = self.sketch(g.reshape(n * (c - 1), -1)).view(n, c - 1, -1)
            ids.append(batch_ids)
            labels.append(batch_labels.cpu())
            probs.append(p)
            classes.append(kept)
            if stored is None and expected is not None and grads == []:
                stored = torch.empty(expected, *g.shape[1:], dtype=torch.float32)
            if stored is not None and seen <= len(stored):
                stored[seen - n : seen] = g
            else:  # N unknown, or more rows than announced: kept in pieces
                if stored is not None:
                    grads, stored = [stored[: seen - n]], None
                grads.append(g.float().cpu())
        if not ids:
            raise TurnoverError("the training data is empty: nothing to fit the influence function on.")
        example_ids = check_ids_known(torch.cat(ids), None)
        n = len(example_ids)
        trace /= n
        stored = stored[:n] if stored is not None else torch.cat(grads)
        del grads
        rows = n * stored.shape[1]
        solver = self.solver if self.solver != "auto" else ("woodbury" if rows <= self.width else "direct")
        factors = MaterialisedFit(example_ids, torch.cat(labels), torch.cat(probs), torch.cat(classes), stored,
                           torch.empty(0), solver, self.damping_factor * trace / self.num_parameters, trace)
        self._check_damping(factors.damping)
        factors.room = self._working_bytes(factors)
        factors.factor = solve_system(factors)
        return factors

    @staticmethod
    def _check_damping(damping: float) -> None:
        if not damping > 0:
            raise TurnoverError(
                "the Gauss-Newton matrix is zero (every training gradient vanished): nothing to invert. Check that "
                "the tracked parameters are the ones training changed."
            )

    def _linear_forward(self, inputs: Mapping[str, torch.Tensor], context: ContextManager
                        ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Logits (with their graph), each tracked Linear's raw output and its input rows ``(B, in)``, from one
        forward in eval mode under ``context`` (calls recorded by :func:`~turnover_hf.estimators.gradients.linear_calls`)."""
        names = [layer.name for layer in self._layers]
        with torch.enable_grad(), eval_mode(self.model), linear_calls(self.model, names) as recorded, context:
            logits = logits_of(self.model(**inputs))
        calls = [recorded[name] for name in names]
        check_classifier_logits(logits)
        n = logits.shape[0]
        outputs, rows = [], []
        for layer, seen in zip(self._layers, calls):
            if len(seen) != 1:
                raise NotFactorisable(f"the Linear {layer.name!r} ran {len(seen)} time(s) in one forward (not once)")
            x, out = seen[0]
            x_rows, out_rows = one_row_each(x, n), one_row_each(out, n)
            if x_rows is None or out_rows is None:
                shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise NotFactorisable(
                    f"the Linear {layer.name!r} sees an input of shape {shape} for a batch of {n}: the factorised "
                    "gradients need one row per example (batch, features)"
                )
            outputs.append(out)
            rows.append(x_rows.detach())
        return logits, outputs, rows

    def _fit_factorised(self, data: TrainData) -> Optional[FactorisedFit]:
        """Layer inputs and output gradients of every kept class, then the class kernel and the factor of ``S``.

        Returns None when an automatic fit is better kept materialised (decided on the first batch, with N known)."""
        ids, labels, probs, classes = [], [], [], []
        deltas: list[list[torch.Tensor]] = [[] for _ in self._layers]
        inputs: list[list[torch.Tensor]] = [[] for _ in self._layers]
        trace, seen = 0.0, 0
        for batch, batch_ids, batch_labels, expected in self._training_batches(data):
            logits, outputs, rows = self._linear_forward(model_inputs(batch, self.device), self._training_masks(batch_ids))
            p = torch.softmax(logits.detach().double(), -1).cpu()
            n, c = p.shape
            a = layer_inputs(self._layers, rows)
            per_example = sum(x.shape[1] for x in a) + (c - 1) * sum(out.shape[-1] for out in outputs)
            first = seen == 0
            if first and self.factorised is None and expected is not None:
                smaller = self.solver != "auto" or expected * (c - 1) <= self.num_parameters
                if not smaller or factorised_gb(expected, c - 1, per_example) > self.max_memory_gb:
                    return None
            if first:
                check_factorised_budget(expected or n, c - 1, per_example, self.max_memory_gb)
            seen += n
            check_factorised_budget(seen, c - 1, per_example, self.max_memory_gb)
            kept = kept_classes(p)
            d = output_gradients(self.model, self._layers, logits, outputs, rows, kept, check=first)
            del logits, outputs
            gram = sum(torch.einsum("njo,nko->njk", dl.double(), dl.double()) * (xl.double() ** 2).sum(1)[:, None, None]
                       for dl, xl in zip(d, a))
            trace += float((curvature_blocks(p, kept) * gram).sum())
            ids.append(batch_ids)
            labels.append(batch_labels.cpu())
            probs.append(p)
            classes.append(kept)
            for i in range(len(self._layers)):
                deltas[i].append(d[i])
                inputs[i].append(a[i])
        if not ids:
            raise TurnoverError("the training data is empty: nothing to fit the influence function on.")
        example_ids = check_ids_known(torch.cat(ids), None)
        trace /= len(example_ids)
        damping = self.damping_factor * trace / self.num_parameters
        self._check_damping(damping)
        fit = FactorisedFit(example_ids, torch.cat(labels), torch.cat(probs), torch.cat(classes), list(self._layers),
                             [torch.cat(x) for x in deltas], [torch.cat(x) for x in inputs], torch.empty(0), damping, trace)
        fit.build_system()
        return fit

