"""The MoA loop: retrieve → weight → merge → generate → error → threshold check → refine or answer."""

from __future__ import annotations

import logging
import threading
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from .adapters import AdapterCache, AdapterInfo, LoRAWeights, read_adapter
from .config import MoAConfig, RouteSettings
from .contribution import Contributions, compute_contributions
from .encoder import Encoder
from .error import teacher_forced_errors
from .generation import Generation, TokenCallback, answer_ids, chat_prompt_ids, generate, token_texts
from .importing import ImportReport, import_adapters
from .indexing import index_folder
from .merging import MERGE_METHODS, Mixer, combine
from .models import BaseModel, load_base_model, shapes_of_linear_modules
from .refinement import RefinementContext, RetrievalPlan, Strategy, get_strategy
from .store import AdapterRecord, AdapterStore, IndexReport, Retrieved
from .trace import AdapterUse, Iteration, TokenError, Trace
from .weighting import relevance_weights

logger = logging.getLogger(__name__)

MERGED_PATH_MIN_TOKENS = 28
"""With execution_path="auto", generations of at least this many tokens merge the deltas into the weights.

`moa bench` measured the break-even length at 27.7 tokens for k=3 on 2 CPU cores with SmolLM2-135M
(docs/BENCHMARKS.md): merging costs 39 ms once, and saves 1.4 ms per generated token.
"""

IterationCallback = Callable[[Iteration], None]


class QueryError(ValueError):
    """The query or a setting of this request is invalid; the message explains how to fix it."""


def clean_query(query: object, max_chars: int) -> str:
    """Strip control characters (except newline and tab) and check the length."""
    if not isinstance(query, str):
        raise QueryError(f"The query must be text, got {type(query).__name__}.")
    cleaned = "".join(ch for ch in query if ch in "\n\t" or unicodedata.category(ch)[0] != "C").strip()
    if not cleaned:
        raise QueryError("The query is empty; type a question or pick an example.")
    if len(cleaned) > max_chars:
        raise QueryError(f"The query is {len(cleaned)} characters long; the limit is {max_chars}. Shorten it.")
    return cleaned


class MoA:
    """Routes queries through a library of LoRA adapters over one base model.

    Requests are serialised by a lock around the model, because a merged mix changes the shared
    base weights while it is active. Per-request state lives in local variables and the returned
    `Trace`, never on this object.
    """

    def __init__(self, config: MoAConfig, base: BaseModel, encoder: Encoder, store: AdapterStore) -> None:
        self.config = config
        self.base = base
        self.encoder = encoder
        self.store = store
        self.mixer = Mixer(base.model)
        self.cache = AdapterCache(config.adapter_cache_size, base.device, base.dtype)
        self.module_shapes = shapes_of_linear_modules(base.model)
        self.lock = threading.Lock()
        self.adapter_infos: OrderedDict[str, tuple[str, AdapterInfo]] = OrderedDict()
        """Adapter folders read so far, by id, with the fingerprint read: an LRU as large as the weight cache."""
        self._infos_lock = threading.Lock()
        self.query_head = None  # a trained retriever head, set by `moa.retriever_training.load_query_head`

    @classmethod
    def from_config(cls, config: MoAConfig | None = None, index_default_library: bool = True) -> MoA:
        """Load the base model, encoder and store named by `config`; index the default library into an empty store."""
        config = config or MoAConfig.load()
        base = load_base_model(config.base_model, config.device, config.dtype, config.model_cache_dir)
        encoder = Encoder(config.encoder, device=base.device)
        store = AdapterStore.open(base.model_id, encoder.encoder_id, config.store_path, config.chroma_url)
        engine = cls(config, base, encoder, store)
        if index_default_library and store.count() == 0 and config.adapters_dir.is_dir():
            report = engine.index(config.adapters_dir, skip_invalid=True)
            logger.info("Indexed the default library %s: %d adapters", config.adapters_dir, len(report.added))
        engine.load_default_query_head()
        return engine

    def load_default_query_head(self) -> None:
        """Use the trained retriever head when one is configured or shipped; see `moa.retriever_training`."""
        try:
            from .retriever_training import load_query_head
        except ImportError:
            return
        self.query_head = load_query_head(self.config.retriever_head, self.encoder)

    # ---- store -------------------------------------------------------------------------------

    def index(self, folder: Path, skip_invalid: bool = False) -> IndexReport:
        return index_folder(folder, self.store, self.encoder, self.module_shapes, skip_invalid)

    def import_adapters(self, source: str, adapter_id: str | None = None, description: str | None = None,
                        hub_cache: Path | None = None) -> ImportReport:
        """Copy the adapters of a folder or hub repo into the library folder and register them (see `moa.importing`)."""
        return import_adapters(source, self.config.adapters_dir, self.store, self.encoder, self.module_shapes,
                               adapter_id, description, hub_cache)

    def adapter_info(self, record: AdapterRecord) -> AdapterInfo:
        """Read an adapter's folder once per fingerprint, so warm requests touch no disk.

        The records are kept in an LRU of `adapter_cache_size` entries, like the weights, so memory
        stays bounded however many adapters a long-running process serves.
        """
        with self._infos_lock:
            cached = self.adapter_infos.get(record.adapter_id)
            if cached is not None and cached[0] == record.fingerprint:
                self.adapter_infos.move_to_end(record.adapter_id)
                return cached[1]
        info = read_adapter(Path(record.path), record.adapter_id)
        with self._infos_lock:
            self.adapter_infos[record.adapter_id] = (record.fingerprint, info)
            self.adapter_infos.move_to_end(record.adapter_id)
            while len(self.adapter_infos) > self.config.adapter_cache_size:
                self.adapter_infos.popitem(last=False)
        return info

    def load_weights(self, records: Sequence[AdapterRecord]) -> list[LoRAWeights]:
        return [self.cache.get(self.adapter_info(record)) for record in records]

    # ---- retrieval ---------------------------------------------------------------------------

    def embed_query(self, text: str, use_trained: bool = True) -> torch.Tensor:
        """Embed a query for retrieval, through the trained query head when there is one. -> (dim,)."""
        embedding = self.encoder.encode([text])[0]
        if use_trained and self.query_head is not None:
            embedding = self.query_head.transform(embedding.unsqueeze(0))[0]
        return embedding

    def retrieve(self, text: str, top_k: int, exclude: set[str] | None = None,
                 use_trained: bool = True) -> list[Retrieved]:
        """Return the `top_k` most relevant adapters for `text`, skipping ids in `exclude`."""
        exclude = exclude or set()
        embedding = self.embed_query(text, use_trained)
        found = self.store.query(embedding, top_k + len(exclude))
        return [item for item in found if item.adapter_id not in exclude][:top_k]

    # ---- one iteration -----------------------------------------------------------------------

    def _select(self, plan: RetrievalPlan, settings: RouteSettings) -> tuple[list[Retrieved], torch.Tensor, str]:
        """Return the adapters, weights and a note for the plan; no adapters means the base model alone."""
        if plan.fixed_weights is not None:
            registered = self.store.adapters()
            retrieved = self.retrieve(plan.query_text, max(len(plan.fixed_weights), 1) + 8,
                                      use_trained=settings.use_trained_retriever)
            similarity = {item.adapter_id: item.similarity for item in retrieved}
            chosen = [Retrieved(registered[adapter_id], similarity.get(adapter_id, float("nan")))
                      for adapter_id in plan.fixed_weights if adapter_id in registered]
            weights = torch.tensor([plan.fixed_weights[item.adapter_id] for item in chosen])
            return chosen, weights, plan.note

        retrieved = self.retrieve(plan.query_text, plan.top_k, plan.exclude, settings.use_trained_retriever)
        kept = [item for item in retrieved if item.similarity >= settings.min_similarity]
        note = plan.note
        if retrieved and not kept:
            note = (note + "; " if note else "") + (
                f"no adapter reaches min_similarity {settings.min_similarity:.2f} "
                f"(best {retrieved[0].similarity:.2f}): the base model answers alone")
        similarities = torch.tensor([item.similarity for item in kept])
        return kept, relevance_weights(similarities, settings.weighting, settings.temperature), note

    def _mix(self, adapters: list[LoRAWeights], weights: torch.Tensor, settings: RouteSettings) -> tuple[list[LoRAWeights], torch.Tensor]:
        if not adapters or settings.merge_method == "exact":
            return adapters, weights
        combined = combine(adapters, weights.tolist(), settings.merge_method, settings.density, seed=settings.seed)
        return [combined], torch.ones(1)

    def _execution_path(self, settings: RouteSettings) -> str:
        if settings.execution_path != "auto":
            return settings.execution_path
        return "merged" if settings.max_new_tokens >= MERGED_PATH_MIN_TOKENS else "unmerged"

    def _generate_with_mix(self, prompt_ids: torch.Tensor, components: list[LoRAWeights], weights: torch.Tensor,
                           path: str, settings: RouteSettings, on_token: TokenCallback | None,
                           stop_event: threading.Event | None) -> Generation:
        context = self.mixer.merged if path == "merged" else self.mixer.unmerged
        with context(components, weights.unsqueeze(0)):
            return generate(self.base.model, self.base.tokenizer, prompt_ids, settings.max_new_tokens,
                            settings.do_sample, settings.sampling_temperature, settings.top_p, settings.seed,
                            on_token, stop_event)

    def run_iteration(self, index: int, query: str, plan: RetrievalPlan, settings: RouteSettings,
                      reference: str | None, on_token: TokenCallback | None = None,
                      stop_event: threading.Event | None = None) -> tuple[Iteration, Generation]:
        """Retrieve, merge, generate and score once. The caller must have acquired `self.lock`."""
        started = time.perf_counter()
        metric = resolve_metric(settings.error_metric, reference)
        chosen, weights, note = self._select(plan, settings)
        adapters = self.load_weights([item.record for item in chosen])
        components, mix_weights = self._mix(adapters, weights, settings)
        path = self._execution_path(settings)

        prompt_ids = chat_prompt_ids(self.base.tokenizer, query, self.config.max_prompt_tokens)
        generation = self._generate_with_mix(prompt_ids, components, mix_weights, path, settings, on_token, stop_event)
        target_ids = answer_ids(self.base.tokenizer, reference) if metric == "nll" else generation.token_ids

        contributions = None
        # a stopped request frees the model at once, so it skips the contribution pass
        if target_ids.numel() and adapters and settings.contributions and not generation.stopped_by_user:
            contributions = compute_contributions(self.base.model, self.mixer, adapters, weights, prompt_ids,
                                                  target_ids, metric, settings.merge_method, settings.density,
                                                  settings.seed)
        errors = self._target_errors(generation, prompt_ids, target_ids, metric, contributions, components, mix_weights)
        uses = self._adapter_uses(chosen, weights, contributions)
        scored = [TokenError(text, float(error), int(token)) for text, error, token in
                  zip(token_texts(self.base.tokenizer, target_ids.tolist()), errors, target_ids)]
        answer_tokens = [TokenError(text, float(error), int(token)) for text, error, token in
                         zip(generation.token_texts, generation.surprisal, generation.token_ids)]
        mean_error = float(errors.mean()) if errors.numel() else 0.0
        iteration = Iteration(
            index=index, retrieval_query=plan.query_text, adapters=uses, merge_method=settings.merge_method,
            execution_path=path, error_metric=metric, answer=generation.text, tokens=scored,
            answer_tokens=answer_tokens, mean_error=mean_error, threshold=settings.threshold, decision="",
            reason=note, base_error=float(contributions.base.mean()) if contributions is not None else None,
            seconds=time.perf_counter() - started,
        )
        return iteration, generation

    def _target_errors(self, generation: Generation, prompt_ids: torch.Tensor, target_ids: torch.Tensor, metric: str,
                       contributions: Contributions | None, components: list[LoRAWeights],
                       mix_weights: torch.Tensor) -> torch.Tensor:
        """Per-token error of the scored tokens under the full mix. -> (T,)."""
        if contributions is not None:
            return contributions.full  # same pass as the leave-one-out rows, so differences are consistent
        if metric == "surprisal":
            return generation.surprisal
        if metric == "entropy":
            return generation.entropy
        device = self.base.device
        with self.mixer.unmerged(components, mix_weights.unsqueeze(0)):
            return teacher_forced_errors(self.base.model, prompt_ids.to(device), target_ids.to(device), metric)[0].cpu()

    @staticmethod
    def _adapter_uses(chosen: list[Retrieved], weights: torch.Tensor, contributions: Contributions | None) -> list[AdapterUse]:
        uses = []
        for i, item in enumerate(chosen):
            use = AdapterUse(item.adapter_id, item.record.name, item.record.domain, float(item.similarity), float(weights[i]))
            if contributions is not None:
                per_token = contributions.leave_one_out[i]
                use.contribution = float(per_token.mean())
                use.alone_error = float(contributions.alone[i].mean())
                use.token_contributions = [float(value) for value in per_token]
            uses.append(use)
        return uses

    # ---- the loop ----------------------------------------------------------------------------

    def route(self, query: str, settings: RouteSettings | None = None, reference: str | None = None,
              on_token: TokenCallback | None = None, on_iteration: IterationCallback | None = None,
              stop_event: threading.Event | None = None, strategy: Strategy | None = None) -> Trace:
        """Answer `query` through the loop; return the iteration with the lowest error and every iteration's record."""
        settings = settings or RouteSettings()
        query = clean_query(query, self.config.max_query_chars)
        reference = reference.strip() if isinstance(reference, str) and reference.strip() else None
        self._check_settings(settings)
        strategy = strategy or get_strategy(settings.strategy)
        plan = RetrievalPlan(query, settings.top_k)
        iterations: list[Iteration] = []
        stopped_because = ""

        with self.lock:
            for index in range(settings.max_iterations):
                iteration, generation = self.run_iteration(index, query, plan, settings, reference, on_token, stop_event)
                iterations.append(iteration)
                stopped_because = self._decide(iteration, index, settings, generation.stopped_by_user)
                if on_iteration is not None:
                    on_iteration(iteration)
                if iteration.decision != "refine":
                    break
                context = RefinementContext(query, settings, iterations, plan, self.store.count())
                plan = strategy(context)

        best = min(range(len(iterations)), key=lambda i: iterations[i].mean_error)
        return Trace(query=query, reference=reference, final_answer=iterations[best].answer, final_iteration=best,
                     stopped_because=stopped_because, iterations=iterations, settings=asdict(settings),
                     stopped_by_user=bool(stop_event is not None and stop_event.is_set()))

    @staticmethod
    def _decide(iteration: Iteration, index: int, settings: RouteSettings, stopped_by_user: bool) -> str:
        """Set the iteration's decision and reason; return why the loop stops (empty when it goes on)."""
        comparison = f"mean error {iteration.mean_error:.3f} vs threshold {settings.threshold:.3f}"
        if stopped_by_user:
            iteration.decision, iteration.reason = "stop", _join(iteration.reason, "stopped by the user")
            return "stopped"
        if iteration.mean_error <= settings.threshold:
            iteration.decision, iteration.reason = "accept", _join(iteration.reason, f"{comparison}: below, accepted")
            return "below_threshold"
        if index + 1 >= settings.max_iterations:
            iteration.decision = "stop"
            iteration.reason = _join(iteration.reason, f"{comparison}: above, but max_iterations "
                                                       f"({settings.max_iterations}) reached")
            return "max_iterations"
        iteration.decision, iteration.reason = "refine", _join(iteration.reason, f"{comparison}: above, refining")
        return ""

    def _check_settings(self, settings: RouteSettings) -> None:
        if settings.merge_method not in MERGE_METHODS:
            raise QueryError(f"Unknown merge method {settings.merge_method!r}; choose one of {', '.join(MERGE_METHODS)}.")
        get_strategy(settings.strategy)
        if settings.max_new_tokens > self.config.max_new_tokens_limit:
            raise QueryError(f"max_new_tokens is {settings.max_new_tokens}; this server allows at most "
                             f"{self.config.max_new_tokens_limit}.")

    # ---- helpers for the app, evaluation and training ----------------------------------------

    def generate_base(self, query: str, settings: RouteSettings | None = None,
                      on_token: TokenCallback | None = None, stop_event: threading.Event | None = None) -> Generation:
        """Answer with the base model alone, for comparison."""
        settings = settings or RouteSettings()
        query = clean_query(query, self.config.max_query_chars)
        prompt_ids = chat_prompt_ids(self.base.tokenizer, query, self.config.max_prompt_tokens)
        with self.lock:
            return generate(self.base.model, self.base.tokenizer, prompt_ids, settings.max_new_tokens,
                            settings.do_sample, settings.sampling_temperature, settings.top_p, settings.seed,
                            on_token, stop_event)

    @torch.inference_mode()
    def reference_nll(self, query: str, reference: str, mixes: Sequence[dict[str, float]],
                      store: AdapterStore | None = None) -> torch.Tensor:
        """Mean NLL of `reference` under each mix (adapter id -> weight) in one batched pass. -> (num_mixes,).

        `store` names the adapters' store when it is not this engine's own (e.g. a second library).
        """
        ids = sorted({adapter_id for mix in mixes for adapter_id in mix})
        registered = (store or self.store).adapters()
        missing = [adapter_id for adapter_id in ids if adapter_id not in registered]
        if missing:
            raise KeyError(f"Not registered: {', '.join(missing)}.")
        adapters = self.load_weights([registered[adapter_id] for adapter_id in ids])
        rows = torch.tensor([[mix.get(adapter_id, 0.0) for adapter_id in ids] for mix in mixes], dtype=torch.float32)
        prompt_ids = chat_prompt_ids(self.base.tokenizer, query, self.config.max_prompt_tokens)
        target_ids = answer_ids(self.base.tokenizer, reference)
        device = self.base.device
        with self.lock, self.mixer.unmerged(adapters, rows if ids else torch.zeros(len(mixes), 0)):
            errors = teacher_forced_errors(self.base.model, prompt_ids.to(device), target_ids.to(device), "nll",
                                           rows=len(mixes))
        return errors.mean(dim=-1).cpu()


def resolve_metric(metric: str, reference: str | None) -> str:
    if metric == "auto":
        return "nll" if reference else "surprisal"
    if metric == "nll" and not reference:
        raise QueryError("error_metric 'nll' needs a reference answer; give one or pick surprisal or entropy.")
    return metric


def _join(first: str, second: str) -> str:
    return f"{first}; {second}" if first else second
