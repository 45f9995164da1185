"""The projected influence function's fitting pass: the eigen design's curvature basis over a spread of training
batches, then one pass writing every example's projected loss gradient to the store and summing the projected
curvature; both sharded over processes (each process its batches, statistics reduced). A mixin of
:class:`~turnover_hf.estimators.projected.scorer.ProjectedInfluenceScorer`, which supplies the model, the tracked
layers and the training losses."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import weakref
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import default_data_collator

from ...data import BATCH_KEY, InstanceIdCollator, check_id_column
from ...errors import TurnoverError
from ..gradients import batch_ids
from ..influence.curvature import curvature_roots
from .gradient_store import RowStore, RowWriter, is_shard_file, shard_names
from .projected_gradients import ProjectedGradients
from .projection import CoordinateSelection, eigen_projections, layer_projections
from .saved import META_NAME

BASIS_SIDE_FACTOR = 4  # eigen design: sides longer than 4 x side_dim are first cut by random signs (moment memory)
TrainData = Union[Dataset, Sequence[Mapping[str, Any]]]


def basis_batches(sizes: Sequence[int], examples: int) -> list[int]:
    """Indices of batches holding about ``examples`` rows, spread evenly over the whole training set (all batches
    when it is not larger)."""
    if sum(sizes) <= examples:
        return list(range(len(sizes)))
    wanted = max(1, math.ceil(examples * len(sizes) / sum(sizes)))
    return sorted({round(i * (len(sizes) - 1) / max(wanted - 1, 1)) for i in range(wanted)})



class FitPass:
    """Fitting of a projected scorer (see the module docstring)."""

    def fit(self, train: TrainData, data_collator: Optional[Callable] = None) -> Any:
        """One pass over ``train`` (a ``datasets.Dataset`` with model inputs, labels and the id column, or a list of
        collated batches with ``example_ids``): the projected curvature and every example's projected loss gradient (written to the store folder).

        Example:
            >>> ProjectedInfluenceScorer(model).fit(train, collator).save("out/model/projected")
        """
        from accelerate import PartialState
        from accelerate.utils import broadcast_object_list, reduce

        batches, sizes = self._training_batches(train, data_collator)
        state = PartialState(cpu=self.device.type == "cpu")
        self._check_store_dir()  # in every process, before any of them writes
        state.wait_for_everyone()
        if self.design == "eigen":
            self._fit_basis(batches, sizes, state)
        folder = [self._new_store_folder() if state.is_main_process else None]
        if state.num_processes > 1:
            broadcast_object_list(folder)
        folder = folder[0]
        with state.split_between_processes(list(range(len(sizes)))) as mine:
            mine = list(mine)
        diagonal = self.curvature_form == "diagonal"
        curvature = torch.zeros((self.dim,) if diagonal else (self.dim, self.dim), dtype=torch.float64,
                                device=self.device)
        with RowWriter(folder, state.process_index, state.num_processes, sum(sizes[i] for i in mine), self.dim) as writer:
            for index in tqdm(mine, desc="projected influence: training gradients", unit="batch",
                              disable=not (self.show_progress and state.is_local_main_process)):
                batch = batches(index)
                ids = batch_ids(batch)
                loss_gradients, curvature_rows = self._training_rows(batch, ids)
                rows64 = curvature_rows.double()
                if diagonal:
                    curvature += rows64.square().sum(0)
                else:
                    curvature.addmm_(rows64.T, rows64)  # in place: no k x k temporary per batch
                writer.write(ids, loss_gradients)
        if state.num_processes > 1:
            curvature = reduce(curvature, reduction="sum")
        state.wait_for_everyone()
        files = [shard_names(rank, state.num_processes)[0] for rank in range(state.num_processes)]
        self._set_fit(RowStore(folder, files, self.dim), curvature.cpu() / sum(sizes))
        self.fit_identity = self.identity()
        return self

    def _fit_basis(self, batches: Callable[[int], Mapping[str, Any]], sizes: list[int], state: Any) -> None:
        """The eigen design's sides: each tracked layer's input and output-gradient second moments over at most
        ``basis_examples`` training examples (batches spread over the whole set, shared among the processes and
        summed), their leading eigenvectors, and the ``k`` Kronecker pairs of largest curvature."""
        from accelerate.utils import broadcast, reduce

        pre = layer_projections(self.model, self.specs, self.projection_dim, self.projection_seed,
                                BASIS_SIDE_FACTOR * self.side_dim)
        probe = ProjectedGradients(self.model, self.specs, pre)
        chosen = basis_batches(sizes, self.basis_examples)
        with state.split_between_processes(chosen) as mine:
            mine = list(mine)
        totals = [[torch.zeros(layer.in_dim, layer.in_dim, dtype=torch.float64, device=self.device),
                   torch.zeros(layer.out_dim, layer.out_dim, dtype=torch.float64, device=self.device),
                   torch.zeros((), dtype=torch.float64, device=self.device)] for layer in pre]
        for index in tqdm(mine, desc="projected influence: curvature eigenbasis", unit="batch",
                          disable=not (self.show_progress and state.is_local_main_process)):
            batch = batches(index)
            for total, (inputs, outputs, positions) in zip(totals, self._basis_moments(probe, batch, batch_ids(batch))):
                total[0] += inputs
                total[1] += outputs
                total[2] += positions
        if state.num_processes > 1:
            totals = reduce(totals, reduction="sum")
        examples = sum(sizes[i] for i in chosen)
        moments = [(inputs.cpu() / max(float(positions), 1.0), outputs.cpu() / examples)
                   for inputs, outputs, positions in totals]
        layers, selection = eigen_projections(pre, moments, self.projection_dim, self.side_dim)
        if state.num_processes > 1:  # every process scores with the main process's bases, bit for bit
            shared = broadcast([t.to(self.device) for layer in layers for t in (layer.inputs, layer.outputs)]
                               + [selection.to(self.device)])
            for i, layer in enumerate(layers):
                layer.inputs, layer.outputs = shared[2 * i].cpu(), shared[2 * i + 1].cpu()
            selection = shared[-1].cpu()
        self._use_layers(layers, CoordinateSelection(selection))

    def _basis_moments(self, probe: ProjectedGradients, batch: Mapping[str, Any], ids: torch.Tensor
                       ) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """One batch's side moments under the training masks, from the same curvature as the fit: the classes
        weighted by the roots of the softmax's Gauss-Newton matrix (classifiers), sampled labels (causal LMs)."""
        inputs, labels = self._inputs_and_labels(batch)
        context, _ = self._training_context(ids)
        if self.causal_lm:
            samples = self.label_samples

            def sampled(logits: torch.Tensor) -> torch.Tensor:
                return torch.stack([self._sampled(logits, labels, ids, draw) for draw in range(samples)], 1)

            def mixing() -> torch.Tensor:
                return torch.eye(samples).expand(len(labels), samples, samples) / math.sqrt(samples)

            return probe.side_moments(inputs, sampled, self._training_loss, mixing, context)
        seen: dict[str, torch.Tensor] = {}

        def roots() -> torch.Tensor:
            if "classes" in seen:
                return curvature_roots(seen["probs"], seen["classes"])
            # sampled classes only (no column of the loss's own label here), each row weighted
            return torch.diag_embed((seen["weights"] / self.label_samples).sqrt())

        return probe.side_moments(inputs, self._class_columns(seen, ids, None), self._training_loss, roots, context)

    def _training_batches(self, train: TrainData, data_collator: Optional[Callable]
                          ) -> tuple[Callable[[int], Mapping[str, Any]], list[int]]:
        """``(batch(i), rows of every batch)``: a Dataset in batches of ``batch_size`` (collated), or a sequence
        of collated batches with ``example_ids`` as they are."""
        if isinstance(train, Dataset):
            check_id_column(train, self.id_column)
            collate = InstanceIdCollator(data_collator or default_data_collator, self.id_column)
            starts = list(range(0, len(train), self.batch_size))

            def batch(i: int) -> Mapping[str, Any]:
                return collate([train[j] for j in range(starts[i], min(starts[i] + self.batch_size, len(train)))])

            sizes = [min(start + self.batch_size, len(train)) - start for start in starts]
        elif isinstance(train, Sequence):
            batch = train.__getitem__
            sizes = [len(torch.as_tensor(b[BATCH_KEY])) if b.get(BATCH_KEY) is not None else 0 for b in train]
        else:
            raise TurnoverError(f"fit takes a datasets.Dataset or a list of collated batches, got {type(train).__name__}.")
        if not sum(sizes):
            raise TurnoverError("the training data is empty: nothing to fit the influence function on.")
        return batch, sizes

    def _check_store_dir(self) -> None:
        """Refuse a ``store_dir`` that already holds a gradient store or a saved fit: a new fit would replace files
        a saved fit (its ``projected.json``) still refers to."""
        if self.store_dir is None or not os.path.exists(self.store_dir):
            return
        if not os.path.isdir(self.store_dir):
            raise TurnoverError(f"store_dir {self.store_dir!r} is a file, not a folder: pass a new or empty folder.")
        held = sorted(name for name in os.listdir(self.store_dir) if name == META_NAME or is_shard_file(name))
        if held:
            raise TurnoverError(
                f"store_dir {self.store_dir!r} already holds a projected-gradient store ({', '.join(held[:3])}"
                f"{', ...' if len(held) > 3 else ''}); a new fit would overwrite it. Pass a new or empty folder as "
                "store_dir, load the saved fit instead (ProjectedInfluenceScorer.load), or delete that folder."
            )

    def _new_store_folder(self) -> str:
        if self.store_dir is not None:
            os.makedirs(self.store_dir, exist_ok=True)
            return self.store_dir
        folder = tempfile.mkdtemp(prefix="turnover-hf-projected-")
        weakref.finalize(self, shutil.rmtree, folder, True)
        return folder

