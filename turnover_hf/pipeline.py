"""``InfluencePipeline``: which training examples made the model say this, and which of them look suspicious.

Example:
    >>> pipe = InfluencePipeline("out/model", train_dataset=train)       # an influence-ready checkpoint
    >>> pipe("a gripping, beautifully shot film", top_k=3)               # proponents and opponents, with their rows
    >>> suspects = pipe.self_influence().sort("self_influence", reverse=True)   # memorised / mislabelled first
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from datasets import Dataset
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .audit import pipeline_audit
from .data import InstanceIdCollator, check_id_column, default_collator
from .errors import TurnoverError
from .estimators import (
    AUTO,
    EstimatorContext,
    EstimatorFallback,
    EstimatorSpec,
    carried_options,
    choose_estimator,
    get_estimator,
)
from .estimators.ensemble import split_half_agreement
from .fingerprints import fingerprint
from .label_issues import pipeline_label_issues
from .losses import is_causal_lm
from .pipeline_inputs import PipelineInputs, TargetsLike, load_models
from .store import ScoreStore, claim_output
from .training_set import load_recorded_training_set, training_set_of
from .validation import model_max_length, positive_int

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 128  # tokens of a text when the models record no training inputs

class InfluencePipeline(PipelineInputs):
    """Score training examples against targets, in transformers' pipeline style: by default with the most
    faithful estimator the model allows (an influence function for a classifier, turn-over dropout for an ensemble
    or a language model; see ``estimator``).

    Args:
        model: a patched model, or the path / Hub id of an influence-ready checkpoint; or an ensemble: a list of
            those trained on the same data with different mask seeds, or the folder
            :func:`~turnover_hf.train_ensemble` wrote (its ``member-*`` folders). An ensemble's turn-over scores are
            the mean of its members' and come with a measured agreement; a single model's are close to noise.
        tokenizer: turns text targets (and a training set without ``input_ids``) into model inputs.
        train_dataset: the training set with its id column (the one the model was trained on); rows are returned
            beside their scores. Must have as many rows as the model was trained on.
        batch_size: (id, target, mask) rows per forward pass.
        text_column: the text column of datasets (training set and dataset targets).
        max_length: truncation length for text (capped at what the model and tokenizer accept). Default: the
            longest input the models were trained on (recorded by the trainer), so that a text training set
            tokenizes exactly as in training; 128 for a model that records none.
        top_k: proponents and opponents returned per target.
        fast: use the exact fast paths (closed-form head, prefix reuse); ``False`` scores row by row.
        estimator: ``"auto"`` (the default: the most faithful estimator the model allows, see below),
            ``"turnover"`` (turn-over dropout, forward passes only), ``"hydra"`` (hypergradients tracked during
            training by :class:`~turnover_hf.HydraTrainer`, loaded from ``hydra_dir``, by default
            ``<checkpoint>/hydra``), ``"influence"`` (the damped Gauss-Newton influence function of
            :class:`~turnover_hf.InfluenceFunctionScorer`, classifiers only, exact) or ``"projected"`` (the same in
            the 4096 directions of largest curvature of the gradients, :class:`~turnover_hf.ProjectedInfluenceScorer`: any
            training-set size, classifiers and causal LMs, its fit sharded over processes). A fitting estimator
            fits on ``train_dataset`` once, on the first call or :meth:`fit`, unless its folder (``influence_dir``,
            ``<checkpoint>/influence``, ``<checkpoint>/projected``) holds a fit of this model; scoring is sharded
            like the other estimators. ``"auto"`` picks ``"hydra"`` when ``hydra_dir`` is given, ``"projected"``
            for a causal language model or when an exact fit would exceed ``max_memory_gb`` (4 by default; also
            when the first training batch shows it), ``"turnover"`` for an ensemble, and ``"influence"`` for any
            other classifier (patched or not). ``pipe.estimator`` says which was chosen. Any estimator registered
            with :func:`turnover_hf.register_estimator` is accepted by its name.
        state_dir: where the chosen estimator's fitted state is loaded from, or saved to after fitting (default:
            its folder beside the checkpoint, see :class:`~turnover_hf.SavedState`). ``hydra_dir`` and
            ``influence_dir`` name the folder of those two estimators (``hydra_dir`` also makes ``"auto"`` pick
            HYDRA).
        influence_dir: where a fitted influence function is loaded from, or saved to after fitting.
        influence_options: options of the influence function: an :class:`~turnover_hf.InfluenceOptions` or a
            dict of its fields (``damping_factor``, ``projection_dim``, ``projection_seed``, ``parameters``,
            ``max_memory_gb``, ``solver``, ``factorised``, ``show_progress``).
        options: the chosen estimator's options (its options dataclass, e.g.
            :class:`~turnover_hf.estimators.influence.InfluenceOptions`, or a dict of its fields).
        save_fit: keep what the estimator fits on first use (the influence function's fit) beside the checkpoint
            (``<model>/influence``), so the next pipeline on that folder loads it instead of fitting again.
        chunk_size: training ids per saved chunk (the unit of resuming and of sharding over processes).
        device: where to run the model (default: where it is).

    Scoring is sharded over the processes of ``accelerate launch`` / ``torchrun`` (training ids split evenly,
    results gathered in order); with ``output_dir`` every chunk is saved and an interrupted run resumes.

    Example:
        >>> pipe = InfluencePipeline(model, tokenizer, train_dataset=train)
        >>> pipe(["the plot is thin", "a triumph"], top_k=5)[0]["proponents"][0]
        {'example_id': 1234, 'score': 0.041, 'text': '...', 'label': 0}
    """

    def __init__(
        self,
        model: Union[nn.Module, str, os.PathLike],
        tokenizer: Optional[PreTrainedTokenizerBase] = None,
        train_dataset: Optional[Dataset] = None,
        *,
        data_collator: Optional[Callable] = None,
        batch_size: int = 64,
        text_column: str = "text",
        max_length: Optional[int] = None,
        top_k: int = 5,
        fast: bool = True,
        chunk_size: int = 1024,
        device: Optional[Union[str, torch.device]] = None,
        estimator: str = "auto",
        hydra_dir: Optional[Union[str, os.PathLike]] = None,
        influence_dir: Optional[Union[str, os.PathLike]] = None,
        influence_options: Optional[Any] = None,
        options: Optional[Any] = None,
        save_fit: bool = False,
        state_dir: Optional[Union[str, os.PathLike]] = None,
    ) -> None:
        positive_int("batch_size", batch_size)
        positive_int("chunk_size", chunk_size, " (training ids per saved chunk)")
        positive_int("top_k", top_k)
        if max_length is not None:
            positive_int("max_length", max_length, " (tokens) or None")
        models, self.checkpoint_path, tokenizer = load_models(model, tokenizer, estimator)
        if train_dataset is None:
            train_dataset = load_recorded_training_set(models)  # the data the checkpoint names, or a clear refusal
        self.models = [(m.to(device) if device is not None else m).eval() for m in models]
        self.model = self.models[0]
        self.causal_lm = is_causal_lm(self.model)  # targets are token sequences: labels = their ids, scores per token
        self._save_fit = save_fit
        self._choose_estimator(estimator, len(train_dataset), batch_size, fast,
                               {"hydra": hydra_dir, "influence": influence_dir}, influence_options, options, state_dir)
        self.tokenizer = tokenizer
        self.text_column = text_column
        self.max_length = self._truncation(max_length)
        self.top_k = top_k
        self.batch_size = batch_size
        self.chunk_size = chunk_size
        self.collator = InstanceIdCollator(data_collator or default_collator(self.model, tokenizer), self.id_column)
        self._use_training_set(train_dataset)

    def _truncation(self, max_length: Optional[int]) -> int:
        """Tokens a text keeps: ``max_length``, by default the longest input the models trained on (so a text
        training set tokenizes as in training), capped at what the model and tokenizer accept."""
        if max_length is None:
            trained = [r.longest_input for r in map(training_set_of, self.models) if r is not None and r.longest_input]
            max_length = max(trained) if trained else DEFAULT_MAX_LENGTH
        limit = model_max_length(self.model, self.tokenizer)
        return min(max_length, limit or max_length)

    def _choose_estimator(self, name: str, num_train_examples: int, batch_size: int, fast: bool,
                          state_dirs: Mapping[str, Any], influence_options: Any, options: Any,
                          state_dir: Optional[Union[str, os.PathLike]]) -> None:
        """Resolve ``name`` (``"auto"`` included) with its typed options, then build it."""
        state_dirs = {k: os.fspath(v) for k, v in state_dirs.items() if v is not None}
        context = EstimatorContext(self.models, self.checkpoint_path, num_train_examples, batch_size=batch_size,
                                   fast=fast, automatic=name == AUTO, state_dirs=state_dirs)
        named = {"influence": influence_options} if influence_options else {}  # the influence function's own argument
        spec, context.options = choose_estimator(name, context, options, named)
        if state_dir is not None:
            if spec.saved_state is None:
                raise TurnoverError(f"state_dir was given, but the {spec.name!r} estimator keeps no saved state; "
                                    "drop state_dir, or choose an estimator that fits (e.g. 'influence').")
            if state_dirs.get(spec.name, os.fspath(state_dir)) != os.fspath(state_dir):
                raise TurnoverError(f"state_dir={os.fspath(state_dir)!r} and {spec.name}_dir="
                                    f"{state_dirs[spec.name]!r} name two folders; give one.")
            state_dirs[spec.name] = os.fspath(state_dir)
        self._context = context
        self._build(spec)

    def _build(self, spec: EstimatorSpec) -> None:
        """Build the estimator ``spec`` from the pipeline's context; its state folder is where a fit is saved."""
        self._context.name = spec.name
        built = spec.build(self._context)
        self.spec, self.scorer, self.estimator = spec, built.estimator, spec.name
        self.id_column, self._expected_examples = built.id_column, built.expected_examples
        # a state fitted on first use is saved in the folder named for this estimator, or beside the checkpoint
        named = spec.name in self._context.state_dirs
        self._state_dir = self._context.state_dir() if named or self._save_fit else None
        self._prepared = False

    def _use_training_set(self, train_dataset: Dataset) -> None:
        """Check ``train_dataset`` against what the models were trained on and keep its model features."""
        self.train_dataset = train_dataset
        self.train_ids = check_id_column(train_dataset, self.id_column)
        tokenized = self._verify_training_set(train_dataset, self._expected_examples)  # tokenized once: checked, then scored
        self._order = torch.argsort(self.train_ids)
        self._train_features = self._model_features(tokenized)

    def fit(self) -> "InfluencePipeline":
        """Let the estimator see the training set once (e.g. fit the influence function) and keep what it fitted
        in its state folder, if it has one. Scoring calls it when needed; call it to time or run the fit apart.

        Example:
            >>> pipe = InfluencePipeline(model, tokenizer, train_dataset=train).fit()
            >>> pipe.self_influence()      # no second fit
        """
        if self._prepared:
            return self
        try:
            fitted = self.scorer.prepare(self._train_features, self.collator)
        except EstimatorFallback as handover:
            logger.warning("%s", handover)
            spec = get_estimator(handover.name)
            self._context.options = spec.options(carried_options(spec, self._context.options))
            self._build(spec)  # its own state folder, never the other estimator's
            fitted = self.scorer.prepare(self._train_features, self.collator)
        self._prepared = True
        if fitted and self._state_dir is not None:
            from accelerate import PartialState

            state = PartialState(cpu=self.scorer.device.type == "cpu")
            if state.is_main_process:
                self.scorer.save(self._state_dir)
            state.wait_for_everyone()
        return self

    def _positions(self, example_ids: torch.Tensor) -> list[int]:
        return self._order[torch.searchsorted(self.train_ids[self._order], example_ids)].tolist()

    def train_rows(self, example_ids: torch.Tensor) -> Dataset:
        """The training rows with these ids, in that order."""
        return self.train_dataset.select(self._positions(example_ids))

    # -- the sharded, resumable loop ----------------------------------------------------------------------------
    def _run(self, kind: str, example_ids: torch.Tensor, n_columns: int, compute: Callable[[torch.Tensor], torch.Tensor],
             key_parts: tuple, output_dir: Optional[str]) -> torch.Tensor:
        from accelerate import PartialState
        from accelerate.utils import gather_object

        store = None
        if output_dir is not None:
            key = fingerprint(kind, self.estimator, self.scorer.cache_key(), *[m.state_dict() for m in self.models],
                              example_ids, *key_parts)
            store = ScoreStore(output_dir, key, example_ids, n_columns, f"{kind} of {len(example_ids)} ids", self.chunk_size)
            done = store.result()
            if done is not None:
                return done
        # A model on the CPU runs its processes on gloo; on accelerators accelerate picks the backend.
        state = PartialState(cpu=self.scorer.device.type == "cpu")
        with claim_output(store.folder if store is not None else None, state):  # one run per folder at a time
            done = store.result() if store is not None else None  # (finished while this one waited to claim it)
            if done is not None:
                return done
            self.fit()
            chunk_size = store.chunk_size if store is not None else self.chunk_size  # a resumed run keeps its layout
            chunks = list(range(0, len(example_ids), chunk_size))
            results: list[tuple[int, torch.Tensor]] = []
            with state.split_between_processes(list(range(len(chunks)))) as mine:
                for index in tqdm(mine, desc=kind, unit="chunk", disable=not state.is_local_main_process or len(mine) < 2):
                    part = store.shard(index) if store is not None else None
                    if part is None:
                        start = chunks[index]
                        part = compute(example_ids[start : start + chunk_size]).reshape(-1, n_columns).cpu()
                        if store is not None:
                            store.write_shard(index, part)
                    results.append((index, part))
            if state.num_processes > 1:
                results = gather_object(results)
            scores = torch.cat([part for _, part in sorted(results, key=lambda item: item[0])]) if results else torch.empty(0, n_columns)
            if store is not None and state.is_main_process:
                store.finish(scores)
            state.wait_for_everyone()
        return scores

    # -- scoring through members --------------------------------------------------------------------------------
    @property
    def num_members(self) -> int:
        """How many models' scores are averaged (1 unless the pipeline holds an ensemble)."""
        return self.scorer.num_members

    def _member_matrix(self, kind: str, batch: Mapping[str, torch.Tensor], labels: torch.Tensor, ids: torch.Tensor,
                       output_dir: Optional[str]) -> torch.Tensor:
        """``(K, n_ids, n_targets)`` scores of every member (K = 1 for a single model)."""
        k, t = self.num_members, len(labels)
        compute = lambda chunk: self.scorer.member_scores(batch, labels, chunk).permute(1, 0, 2).reshape(len(chunk), k * t)
        flat = self._run(kind, ids, k * t, compute, (batch, labels), output_dir)
        return flat.reshape(len(ids), k, t).permute(1, 0, 2)

    def _agreement(self, members: torch.Tensor) -> Optional[list[float]]:
        if members.shape[0] < 2 or members.shape[1] < 3:
            return None
        return split_half_agreement(members)["estimated"]

    # -- public -------------------------------------------------------------------------------------------------
    def scores(self, targets: TargetsLike, example_ids: Optional[Sequence[int]] = None, *, output_dir: Optional[str] = None) -> torch.Tensor:
        """The (n_ids, n_targets) influence matrix; rows follow ``example_ids`` (default: the training set's order).

        Example:
            >>> pipe.scores(valid.select(range(100)), output_dir="scores/valid100")   # resumable
        """
        batch, labels, _ = self.prepare_targets(targets)
        return self._member_matrix("scores", batch, labels, self._ids(example_ids), output_dir).mean(0)

    def agreement(self, targets: TargetsLike, example_ids: Optional[Sequence[int]] = None, *,
                  output_dir: Optional[str] = None) -> list[float]:
        """How reproducible each target's ranking is: the estimated Spearman agreement of this ensemble's scores
        with another ensemble of the same size and other seeds (split-half, Spearman-Brown; see
        :func:`~turnover_hf.split_half_agreement`). Needs an ensemble; ~0 means the ranking is noise.

        Example:
            >>> pipe.agreement(valid.select(range(20)))          # one value per target
        """
        if self.num_members < 2:
            raise TurnoverError(
                "agreement is measured between ensemble members and this pipeline has one model: train several "
                "with turnover_hf.train_ensemble(...) and pass their folder (or a list of models)."
            )
        batch, labels, _ = self.prepare_targets(targets)
        ids = self._ids(example_ids)
        if len(ids) < 3:
            raise TurnoverError("agreement is a rank correlation over training ids: score at least 3 of them.")
        return self._agreement(self._member_matrix("scores", batch, labels, ids, output_dir))

    def mean_influence(self, targets: TargetsLike, example_ids: Optional[Sequence[int]] = None, *,
                       output_dir: Optional[str] = None) -> Dataset:
        """Each training example's mean influence over a target set (data cleansing, paper Table 2), as a Dataset.

        Example:
            >>> harmful = pipe.mean_influence(valid).sort("mean_influence").select(range(20))
        """
        batch, labels, _ = self.prepare_targets(targets)
        ids = self._ids(example_ids)
        k = self.num_members
        means = self._run(
            "mean_influence", ids, k,
            lambda chunk: self.scorer.member_scores(batch, labels, chunk).mean(2).T,
            (batch, labels), output_dir,
        )
        return self.train_rows(ids).add_column("mean_influence", means.mean(1).tolist())

    def self_influence(self, example_ids: Optional[Sequence[int]] = None, *, output_dir: Optional[str] = None) -> Dataset:
        """Each training example's influence on its own prediction (paper App. E), as a Dataset.

        Most examples help themselves (positive values). The highest values flag examples only the sub-network
        that saw them gets right: memorised, and often mislabelled (the rest of the data predicts another label).
        With an ensemble the members' values are averaged and the ranking's estimated agreement is logged.

        Example:
            >>> pipe.self_influence().sort("self_influence", reverse=True).select(range(10))["text"]
        """
        ids = self._ids(example_ids)
        k = self.num_members

        def compute(chunk: torch.Tensor) -> torch.Tensor:
            rows = self._train_features.select(self._positions(chunk))
            batches = [self.collator([rows[i] for i in range(start, min(start + self.batch_size, len(chunk)))])
                       for start in range(0, len(chunk), self.batch_size)]
            return self.scorer.self_score_columns(batches)

        values = self._run("self_influence", ids, k, compute, (), output_dir)
        agreement = self._agreement(values.T[:, :, None])
        if agreement is not None:
            logger.info("self-influence of %d ids, %d members: estimated ranking agreement %.3f.", len(ids), k, agreement[0])
        return self.train_rows(ids).add_column("self_influence", values.mean(1).tolist())

    def label_issues(self, method: Optional[str] = None, *, top_k: Optional[int] = None,
                     num_issues: Optional[int] = None) -> Dataset:
        """The training set ranked from most to least suspicious label (see :mod:`turnover_hf.label_issues`).

        ``method`` defaults to the one ``benchmarks/label_errors.py`` measured best; methods reading training
        dynamics load them from the checkpoint (recorded by :class:`~turnover_hf.TrainingDynamicsCallback`).
        Columns: rank, example_id, given and suggested label, score, is_issue, method, and the text.

        Example:
            >>> pipe.label_issues(top_k=20).filter(lambda row: row["is_issue"])["text"]
        """

        return pipeline_label_issues(self, method, top_k=top_k, num_issues=num_issues)

    def audit(self, validation: Optional[Dataset] = None, test: Optional[Dataset] = None, **options: Any) -> Dataset:
        """One Dataset of data issues: wrong labels, duplicates, leakage into ``validation`` / ``test``, outliers and
        the examples most harmful to ``validation`` (see :mod:`turnover_hf.audit` for the kinds, columns and
        ``options``; what was skipped is in ``.info.description``).

        Example:
            >>> issues = pipe.audit(validation=valid, test=test)
            >>> issues.filter(lambda row: row["kind"] == "leakage")["reason"][:3]
        """
        return pipeline_audit(self, validation, test, **options)

    def __call__(self, targets: TargetsLike, top_k: Optional[int] = None, example_ids: Optional[Sequence[int]] = None,
                 *, output_dir: Optional[str] = None) -> Union[dict[str, Any], list[dict[str, Any]]]:
        """Top-k proponents (most helpful) and opponents (most harmful) of each target, with their training rows.

        Returns one dict for a single text or dict target, a list of dicts otherwise. Each dict has ``label``,
        ``label_source`` ("given" or "predicted"), ``proponents``, ``opponents``, ``members`` (how many models were
        averaged) and ``agreement``: the ranking's estimated agreement with an independent ensemble of the same size
        (None for a single model, whose rankings are close to noise; see :meth:`agreement`).

        Causal LMs take text (every token counts) or ``(prompt, completion)`` tuples (the completion's tokens count).
        ``score`` is then the influence on the mean loss of the counted tokens; each dict also has ``tokens`` (the
        counted tokens) and each proponent / opponent ``token_scores`` (its influence on each of those tokens) and
        ``score_sum`` (their sum: the influence on the summed loss).
        """
        top_k = self.top_k if top_k is None else positive_int("top_k", top_k)
        batch, labels, sources, single = self._prepare(targets)
        ids = self._ids(example_ids)
        members = self._member_matrix("scores", batch, labels, ids, output_dir)
        matrix = members.mean(0)
        agreement = self._agreement(members)
        k = min(top_k, len(ids))
        out = []
        for t in range(len(labels)):
            column = matrix[:, t]
            best = torch.topk(column, k)
            worst = torch.topk(-column, k)
            out.append({
                "label": labels[t].item() if labels.dim() == 1 else None,
                "label_source": sources[t],
                "members": self.num_members,
                "agreement": None if agreement is None else agreement[t],
                "proponents": self._explain(ids[best.indices], best.values),
                "opponents": self._explain(ids[worst.indices], -worst.values),
            })
        if self.causal_lm and self.scorer.token_level:
            for t, entry in enumerate(out):
                self._add_token_scores(entry, batch, labels, t)
        return out[0] if single else out

    # -- causal language models: which target tokens an example helped or hurt ---------------------------------
    def token_scores(self, targets: TargetsLike, example_ids: Optional[Sequence[int]] = None, *,
                     output_dir: Optional[str] = None) -> torch.Tensor:
        """Per-token influence of a causal LM, ``(n_ids, n_targets, T)``: how each training example changed the loss
        of each counted token of each target (0 on prompt and padding); summed over tokens it is the influence on
        the completion's summed loss. Targets: text, ``(prompt, completion)`` tuples, or lists of them.

        Example:
            >>> per_token = pipe.token_scores(("The film was", " a triumph"))
            >>> per_token[:, 0].sum(-1).topk(3)       # the strongest proponents of the whole completion
        """
        if not self.causal_lm or not self.scorer.token_level:
            raise TurnoverError(
                f"token_scores is for causal language models scored by an estimator with per-token scores (such as "
                f"'turnover'); this pipeline's {self.estimator!r} estimator on a "
                f"{'causal language model' if self.causal_lm else 'classifier'} has none. Use scores(...)."
            )
        batch, labels, _ = self.prepare_targets(targets)
        ids = self._ids(example_ids)
        n, width = labels.shape
        flat = self._run("token_scores", ids, n * width,
                         lambda chunk: self.scorer.token_scores(batch, labels, chunk).reshape(len(chunk), -1),
                         (batch, labels), output_dir)
        return flat.view(len(ids), n, width)

    def _add_token_scores(self, entry: dict[str, Any], batch: Mapping[str, torch.Tensor], labels: torch.Tensor, t: int) -> None:
        """Give an explained LM target its counted tokens, and each proponent / opponent its score per token."""
        counted = (labels[t] != -100).nonzero().flatten()
        counted = counted[counted > 0]  # the first token is never predicted
        token_ids = labels[t, counted].tolist()
        entry["tokens"] = [self.tokenizer.decode([i]) for i in token_ids] if self.tokenizer is not None else token_ids
        people = entry["proponents"] + entry["opponents"]
        if not people:
            return
        one = {k: v[t : t + 1] for k, v in batch.items() if isinstance(v, torch.Tensor)}
        ids = torch.tensor([p["example_id"] for p in people])
        per_token = self.scorer.token_scores(one, labels[t : t + 1], ids)[:, 0, counted]
        for person, values in zip(people, per_token.tolist()):
            person["score_sum"] = float(sum(values))
            person["token_scores"] = values

    def _explain(self, ids: torch.Tensor, values: torch.Tensor) -> list[dict[str, Any]]:
        rows = self.train_rows(ids)
        shown = [c for c in rows.column_names if c not in ("input_ids", "attention_mask", "token_type_ids", self.id_column)]
        return [
            {"example_id": int(i), "score": float(v), **{c: rows[n][c] for c in shown}}
            for n, (i, v) in enumerate(zip(ids.tolist(), values.tolist()))
        ]
