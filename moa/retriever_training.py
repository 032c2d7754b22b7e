"""Training the retriever from the language model, as Atlas trains its retriever.

Each training query retrieves K candidate adapters with the untrained encoder, plus a "no
adapter" candidate. The language model scores every candidate on the query's reference answer
in one batched forward pass (rows: each adapter alone, each leave-one-out mix, the full mix,
no adapter). Those scores become a target distribution, and a small query-side head is trained
so the retriever's distribution over the same candidates matches it:

- PDist: g_i = −(mean NLL with adapter i alone); loss KL(softmax(g/T_g) ‖ softmax(s/T_s)).
- LOOP: g_i = mean NLL of the mix without adapter i; same loss.
- EMDR²: −log Σ_i softmax(s/T_s)_i · p_LM(reference | adapter i), the marginal likelihood.
- supervised: cross-entropy over all adapters towards those labelled with the query's domain.

Only the query side is trained (a residual linear map on the query embedding and a score for
the no-adapter candidate), so the stored keys need no re-indexing.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from .config import REPO_ROOT
from .encoder import Encoder
from .generation import answer_ids
from .weighting import leave_one_out_weights, relevance_weights

logger = logging.getLogger(__name__)

DEFAULT_HEAD_PATH = REPO_ROOT / "retriever" / "query_head.safetensors"
VARIANTS = ("pdist", "loop", "emdr", "supervised")


class QueryHead(torch.nn.Module):
    """q ↦ normalize(q + W q + b): starts as the identity, so an untrained head changes nothing.

    With `rank`, W is trained as a low-rank product B A (rank × dim parameters each), which a few
    hundred teacher-scored queries can fit without memorising them. It is saved as the dense W.
    """

    def __init__(self, dim: int, encoder_id: str = "", variant: str = "", rank: int = 0) -> None:
        super().__init__()
        if not 0 <= rank <= dim:
            raise ValueError(f"rank must be between 0 (a dense map) and the embedding size {dim}, got {rank}.")
        self.rank = rank
        if rank:
            self.down = torch.nn.Linear(dim, rank, bias=False)  # A: random, as LoRA initialises it
            self.up = torch.nn.Linear(rank, dim)  # B: zero, so B A starts at 0
            torch.nn.init.zeros_(self.up.weight)
            torch.nn.init.zeros_(self.up.bias)
        else:
            self.linear = torch.nn.Linear(dim, dim)
            torch.nn.init.zeros_(self.linear.weight)
            torch.nn.init.zeros_(self.linear.bias)
        # NOTE: the "no adapter" score is trained and saved, but MoA.retrieve does not use it yet.
        self.null_score = torch.nn.Parameter(torch.tensor(0.0))
        """Similarity-scale score of the "no adapter" candidate."""
        self.encoder_id = encoder_id
        self.variant = variant

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        offset = self.up(self.down(queries)) if self.rank else self.linear(queries)  # (n, dim)
        return F.normalize(queries + offset, dim=-1)

    @torch.no_grad()
    def transform(self, queries: torch.Tensor) -> torch.Tensor:
        return self.forward(queries.float())

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W (dim, dim) and b (dim,) of the residual map, whatever the training parametrisation."""
        if self.rank:
            return self.up.weight @ self.down.weight, self.up.bias
        return self.linear.weight, self.linear.bias

    def save(self, path: Path) -> None:
        weight, bias = self.dense()
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"weight": weight.detach().contiguous(), "bias": bias.detach().contiguous(),
                   "null_score": self.null_score.detach().reshape(1)}
        save_file(tensors, str(path), metadata={"encoder": self.encoder_id, "variant": self.variant,
                                                "rank": str(self.rank)})


def load_query_head(path: Path | None, encoder: Encoder) -> QueryHead | None:
    """Load a trained head made for `encoder`; None when there is none or it belongs to another encoder."""
    path = Path(path) if path is not None else DEFAULT_HEAD_PATH
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    if metadata.get("encoder") != encoder.encoder_id or tensors["weight"].shape[0] != encoder.dim:
        logger.warning("Ignoring retriever head %s: it was trained for encoder %r, not %r", path,
                       metadata.get("encoder"), encoder.encoder_id)
        return None
    head = QueryHead(encoder.dim, metadata.get("encoder", ""), metadata.get("variant", ""))
    head.linear.weight.data.copy_(tensors["weight"])
    head.linear.bias.data.copy_(tensors["bias"])
    head.null_score.data.copy_(tensors["null_score"][0])
    return head.eval()


@dataclass
class TeacherExample:
    """One training query with its candidates and the language model's scores of them."""

    query: str
    domain: str
    embedding: torch.Tensor  # (dim,) untrained query embedding
    candidates: list[str]  # K adapter ids
    nll_alone: torch.Tensor  # (K,) mean NLL with each adapter alone
    nll_without: torch.Tensor  # (K,) mean NLL of the relevance-weighted mix without each adapter
    nll_full: float
    nll_base: float
    tokens: int  # reference length, to turn mean NLL into a sequence log-likelihood


def teacher_examples(engine, examples: Sequence, candidates: int, temperature: float = 0.1,
                     cache: Path | None = None, save_every: int = 16) -> list[TeacherExample]:
    """Score every query's K candidates with the language model, one batched pass per query.

    With `cache`, scored queries are saved every `save_every` queries and reused, so a stopped run
    resumes where it stopped. The cache is dropped when the model, encoder, library, K or the
    weighting temperature differ from the run that wrote it. Adapters are compared by fingerprint,
    so new weights or new keys drop the cache too.
    """
    adapters = {adapter_id: record.fingerprint for adapter_id, record in sorted(engine.store.adapters().items())}
    signature = {"model": engine.base.model_id, "encoder": engine.encoder.encoder_id, "candidates": candidates,
                 "temperature": temperature, "adapters": adapters}
    done = _load_teacher_cache(cache, signature)
    pending = [example for example in examples if example.prompt not in done]
    if done:
        logger.info("Teacher scores: %d queries cached in %s, %d to score", len(examples) - len(pending), cache,
                    len(pending))

    for position, example in enumerate(tqdm(pending, desc="teacher scores")):
        done[example.prompt] = score_candidates(engine, example, candidates, temperature)
        if cache is not None and ((position + 1) % save_every == 0 or position + 1 == len(pending)):
            _save_teacher_cache(cache, signature, done)
    return [done[example.prompt] for example in examples]


def score_candidates(engine, example, candidates: int, temperature: float) -> TeacherExample:
    """Retrieve K candidates with the untrained encoder and score them all in one batched pass."""
    embedding = engine.encoder.encode([example.prompt])[0].clone()  # out of inference mode, for the head
    retrieved = engine.store.query(embedding, candidates)  # the plain encoder's ranking, embedded once
    ids = [item.adapter_id for item in retrieved]
    weights = relevance_weights(torch.tensor([item.similarity for item in retrieved]), "softmax", temperature)
    loo = leave_one_out_weights(weights)  # (1 + 2K, K): full, without i, alone i
    rows = [dict(zip(ids, row.tolist())) for row in loo] + [{}]  # the last row is the base model
    nll = engine.reference_nll(example.prompt, example.response, rows)  # (2 + 2K,)

    k = len(ids)
    return TeacherExample(
        query=example.prompt, domain=example.segment or "", embedding=embedding,
        candidates=ids, nll_alone=nll[1 + k:1 + 2 * k], nll_without=nll[1:1 + k], nll_full=float(nll[0]),
        nll_base=float(nll[-1]), tokens=int(answer_ids(engine.base.tokenizer, example.response).numel()),
    )


def _load_teacher_cache(path: Path | None, signature: dict) -> dict[str, TeacherExample]:
    if path is None or not path.is_file():
        return {}
    saved = torch.load(path, weights_only=False)
    if saved.get("signature") != signature:
        logger.warning("Ignoring teacher cache %s: it was scored with other settings or another library", path)
        return {}
    return {row["query"]: TeacherExample(**row) for row in saved["examples"]}


def _save_teacher_cache(path: Path, signature: dict, done: dict[str, TeacherExample]) -> None:
    """Write to a temporary file and rename it, so a killed run never leaves a truncated cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".partial")
    torch.save({"signature": signature, "examples": [vars(example) for example in done.values()]}, partial)
    partial.replace(path)


@dataclass
class KeyTable:
    """Every adapter's key vectors, for scoring candidates with a trainable query side."""

    adapter_ids: list[str]
    keys: torch.Tensor  # (num_keys, dim)
    owner: torch.Tensor  # (num_keys,) index into adapter_ids

    @classmethod
    def from_store(cls, store) -> KeyTable:
        key_owners, vectors = store.keys()
        adapter_ids = sorted(set(key_owners))
        index = {adapter_id: i for i, adapter_id in enumerate(adapter_ids)}
        return cls(adapter_ids, F.normalize(vectors, dim=-1), torch.tensor([index[a] for a in key_owners]))

    def similarities(self, queries: torch.Tensor) -> torch.Tensor:
        """Best key similarity per adapter. (n, dim) -> (n, num_adapters)."""
        per_key = queries @ self.keys.T  # (n, num_keys)
        result = torch.full((queries.shape[0], len(self.adapter_ids)), -2.0)
        return result.scatter_reduce(1, self.owner.expand(queries.shape[0], -1), per_key, reduce="amax")


@dataclass
class TrainingSettings:
    variant: str = "pdist"
    epochs: int = 40
    learning_rate: float = 3e-3
    batch_size: int = 32
    teacher_temperature: float = 0.01
    """T_g: temperature of the target distribution over candidates (Atlas uses 0.01)."""
    retriever_temperature: float = 0.01
    """T_s: temperature of the retriever's distribution over candidates."""
    supervised_temperature: float = 0.05
    weight_decay: float = 0.0
    rank: int = 0
    """Rank of the trained residual map; 0 trains a dense dim × dim map."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}.")
        if self.teacher_temperature <= 0 or self.retriever_temperature <= 0:
            raise ValueError("teacher_temperature and retriever_temperature must be > 0.")
        if self.rank < 0:
            raise ValueError(f"rank must be >= 0 (0 trains a dense map), got {self.rank}.")


def candidate_scores(head: QueryHead, table: KeyTable, batch: Sequence[TeacherExample]) -> torch.Tensor:
    """Retriever scores of each example's candidates, the "no adapter" candidate last. -> (B, K + 1)."""
    queries = head(torch.stack([example.embedding for example in batch]))
    similarities = table.similarities(queries)  # (B, num_adapters)
    index = {adapter_id: i for i, adapter_id in enumerate(table.adapter_ids)}
    columns = torch.tensor([[index[a] for a in example.candidates] for example in batch])
    chosen = similarities.gather(1, columns)
    return torch.cat([chosen, head.null_score.expand(len(batch), 1)], dim=1)


def teacher_targets(batch: Sequence[TeacherExample], variant: str) -> torch.Tensor:
    """The language model's score g of each candidate, "no adapter" last. -> (B, K + 1)."""
    if variant == "pdist":
        return torch.stack([torch.cat([-e.nll_alone, torch.tensor([-e.nll_base])]) for e in batch])
    if variant == "loop":
        return torch.stack([torch.cat([e.nll_without, torch.tensor([e.nll_full])]) for e in batch])
    if variant == "emdr":
        return torch.stack([torch.cat([-e.nll_alone, torch.tensor([-e.nll_base])]) * e.tokens for e in batch])
    raise ValueError(f"No teacher target for variant {variant!r}.")


def loss_for_batch(head: QueryHead, table: KeyTable, batch: Sequence[TeacherExample], settings: TrainingSettings,
                   domain_of: dict[str, str]) -> torch.Tensor:
    if settings.variant == "supervised":
        queries = head(torch.stack([example.embedding for example in batch]))
        logits = table.similarities(queries) / settings.supervised_temperature  # (B, num_adapters)
        positives = torch.tensor([[domain_of.get(a) == e.domain for a in table.adapter_ids] for e in batch])
        log_probs = logits.log_softmax(-1)
        return -(torch.logsumexp(log_probs.masked_fill(~positives, -1e9), dim=-1)).mean()
    scores = candidate_scores(head, table, batch) / settings.retriever_temperature
    targets = teacher_targets(batch, settings.variant)
    if settings.variant == "emdr":
        # log Σ_i p_retriever(i) · p_LM(y | i), computed in log space; the LM side carries no gradient
        return -torch.logsumexp(scores.log_softmax(-1) + targets, dim=-1).mean()
    target = (targets / settings.teacher_temperature).softmax(-1)
    return F.kl_div(scores.log_softmax(-1), target, reduction="batchmean")


@dataclass
class TrainingCurve:
    variant: str
    loss: list[float] = field(default_factory=list)
    validation_loss: list[float] = field(default_factory=list)
    validation_accuracy: list[float] = field(default_factory=list)
    best_epoch: int = 0
    """1-based epoch whose head is kept: the lowest validation loss, or the last epoch without validation."""


def train_head(examples: Sequence[TeacherExample], table: KeyTable, domain_of: dict[str, str], encoder_id: str,
               settings: TrainingSettings, validation: Sequence[TeacherExample] = ()) -> tuple[QueryHead, TrainingCurve]:
    """Fit a query head on precomputed teacher scores. Cheap: the encoder and the LM are not run here.

    The head kept is the one from the epoch with the lowest validation loss under the variant's own
    objective, so the LM-trained variants never see a domain label.
    """
    torch.manual_seed(settings.seed)
    head = QueryHead(table.keys.shape[1], encoder_id, settings.variant, settings.rank)
    optimizer = torch.optim.AdamW(head.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    curve = TrainingCurve(settings.variant)
    order = list(range(len(examples)))
    rng = random.Random(settings.seed)
    best_state = None
    for epoch in range(1, settings.epochs + 1):
        rng.shuffle(order)
        losses = []
        for start in range(0, len(order), settings.batch_size):
            batch = [examples[i] for i in order[start:start + settings.batch_size]]
            loss = loss_for_batch(head, table, batch, settings, domain_of)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        curve.loss.append(sum(losses) / len(losses))
        if not validation:
            continue

        with torch.no_grad():
            curve.validation_loss.append(loss_for_batch(head, table, validation, settings, domain_of).item())
        curve.validation_accuracy.append(routing_accuracy(head, table, validation, domain_of)["acc@1"])
        if best_state is None or curve.validation_loss[-1] < curve.validation_loss[curve.best_epoch - 1]:
            curve.best_epoch = epoch
            best_state = {name: tensor.clone() for name, tensor in head.state_dict().items()}

    if best_state is None:
        curve.best_epoch = settings.epochs
    else:
        head.load_state_dict(best_state)
    return head.eval(), curve


@torch.no_grad()
def rank_adapters(head: QueryHead | None, table: KeyTable, embeddings: torch.Tensor,
                  excluded: Sequence[set[str]] | None = None) -> list[list[str]]:
    """Adapters for each query, best first, optionally without some adapters per query."""
    queries = head(embeddings) if head is not None else F.normalize(embeddings, dim=-1)
    similarities = table.similarities(queries)
    rankings = []
    for row, scores in enumerate(similarities):
        order = [table.adapter_ids[i] for i in scores.argsort(descending=True).tolist()]
        if excluded is not None:
            order = [a for a in order if a not in excluded[row]]
        rankings.append(order)
    return rankings


def routing_accuracy(head: QueryHead | None, table: KeyTable, examples: Sequence[TeacherExample],
                     domain_of: dict[str, str]) -> dict[str, float]:
    """Accuracy@1, @3 and MRR of routing each query to an adapter of its own domain."""
    rankings = rank_adapters(head, table, torch.stack([e.embedding for e in examples]))
    return _rank_metrics([[domain_of.get(a) for a in ranking] for ranking in rankings], [e.domain for e in examples])


def _rank_metrics(ranked_labels: list[list], wanted: list) -> dict[str, float]:
    hits1, hits3, reciprocal = [], [], []
    for labels, target in zip(ranked_labels, wanted):
        rank = labels.index(target) + 1 if target in labels else None
        hits1.append(float(rank == 1))
        hits3.append(float(rank is not None and rank <= 3))
        reciprocal.append(1.0 / rank if rank else 0.0)
    count = max(1, len(hits1))
    return {"acc@1": sum(hits1) / count, "acc@3": sum(hits3) / count, "mrr": sum(reciprocal) / count}


@dataclass
class HeadReport:
    """Test-split numbers of one retriever (a trained head, or None for the untrained encoder)."""

    routing: dict[str, float]
    without_own_expert: dict[str, float]
    merged_nll: float


def evaluate_heads(engine, heads: dict[str, QueryHead | None], examples: Sequence, table: KeyTable,
                   domain_of: dict[str, str], top_k: int = 3, temperature: float = 0.1) -> dict[str, HeadReport]:
    """Routing accuracy, routing without the query's own expert, and the NLL of each retriever's top-k merge.

    With the own expert removed, the right answer is the remaining adapter with the lowest
    reference NLL, so every adapter's NLL is measured too, in the same batched pass.
    """
    names = list(heads)
    embeddings = engine.encoder.encode([example.prompt for example in examples]).clone()  # out of inference mode
    own = [{a for a in table.adapter_ids if domain_of.get(a) == (e.segment or "")} for e in examples]
    rankings = {name: rank_adapters(head, table, embeddings) for name, head in heads.items()}
    excluded_rankings = {name: rank_adapters(head, table, embeddings, own) for name, head in heads.items()}
    with torch.no_grad():
        similarities = {name: table.similarities(head(embeddings) if head is not None else embeddings)
                        for name, head in heads.items()}

    merged = {name: [] for name in names}
    nearest_useful = []
    for row, example in enumerate(tqdm(examples, desc="retriever test")):
        mixes = []
        for name in names:
            top = rankings[name][row][:top_k]
            scores = torch.tensor([similarities[name][row, table.adapter_ids.index(a)] for a in top])
            mixes.append(dict(zip(top, relevance_weights(scores, "softmax", temperature).tolist())))
        singles = [{a: 1.0} for a in table.adapter_ids]
        nll = engine.reference_nll(example.prompt, example.response, mixes + singles)
        for position, name in enumerate(names):
            merged[name].append(float(nll[position]))
        single = nll[len(names):]
        allowed = [i for i, a in enumerate(table.adapter_ids) if a not in own[row]]
        nearest_useful.append(table.adapter_ids[min(allowed, key=lambda i: float(single[i]))])

    reports = {}
    wanted_domains = [example.segment or "" for example in examples]
    for name in names:
        routing = _rank_metrics([[domain_of.get(a) for a in r] for r in rankings[name]], wanted_domains)
        without = _rank_metrics(excluded_rankings[name], nearest_useful)
        reports[name] = HeadReport(routing, without, sum(merged[name]) / max(1, len(merged[name])))
    return reports


def save_curves(curves: Sequence[TrainingCurve], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 3.6))
    for curve in curves:
        epochs = range(1, len(curve.loss) + 1)
        line, = loss_axis.plot(epochs, curve.loss, label=f"{curve.variant} (train)")
        if curve.validation_loss:
            loss_axis.plot(epochs, curve.validation_loss, linestyle="--", color=line.get_color(),
                           label=f"{curve.variant} (validation)")
        if curve.validation_accuracy:
            accuracy_axis.plot(epochs, curve.validation_accuracy, color=line.get_color(), label=curve.variant)
            accuracy_axis.plot([curve.best_epoch], [curve.validation_accuracy[curve.best_epoch - 1]], marker="o",
                               color=line.get_color())
    loss_axis.set(xlabel="epoch", ylabel="loss", title="Loss (each variant on its own scale)")
    loss_axis.legend(fontsize=7)
    loss_axis.set_yscale("log")
    accuracy_axis.set(xlabel="epoch", ylabel="routing accuracy@1",
                      title="Validation routing accuracy@1 (dot: kept epoch)")
    accuracy_axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


@dataclass
class RetrieverRun:
    """Every head trained by `train_retriever`, its curves and test numbers, and the head to ship."""

    heads: dict[str, QueryHead | None]
    curves: list[TrainingCurve]
    reports: dict[str, HeadReport]
    chosen: str
    grid: list[dict]
    """One row per (variant, T_s) tried: the kept epoch and its validation accuracy@1."""
    routing_only: dict[str, dict[str, float]]
    """Each retriever's routing metrics on a larger test sample, from the encoder alone (no LM pass)."""
    train_queries: int
    validation_queries: int
    test_queries: int
    candidates: int
    settings: dict[str, float]

    def to_json(self) -> dict:
        return {"chosen": self.chosen, "train_queries": self.train_queries,
                "validation_queries": self.validation_queries, "test_queries": self.test_queries,
                "candidates": self.candidates, "settings": self.settings, "grid": self.grid,
                "routing_only": self.routing_only,
                "curves": {c.variant: {"loss": c.loss, "validation_loss": c.validation_loss,
                                       "validation_acc@1": c.validation_accuracy, "best_epoch": c.best_epoch}
                           for c in self.curves},
                "test": {name: vars(report) for name, report in self.reports.items()}}


def train_retriever(engine, train: Sequence, validation: Sequence, test: Sequence, candidates: int = 8,
                    variants: Sequence[str] = VARIANTS, settings: TrainingSettings | None = None,
                    retriever_temperatures: Sequence[float] = (0.01,), cache: Path | None = None,
                    routing_test: Sequence = ()) -> RetrieverRun:
    """Score the training and validation queries with the LM, train the heads, and test them all.

    Each LM-trained variant (PDist, LOOP, EMDR²) is trained once per retriever temperature T_s and
    keeps the one with the best validation accuracy@1. The head to ship is the LM-trained variant
    with the best validation accuracy@1; the supervised head is a baseline only. `routing_test`
    (optional, usually larger than `test`) is routed by every head with the encoder alone.
    """
    registered = engine.store.adapters()
    if candidates > len(registered):
        raise ValueError(f"candidates={candidates} is more than the {len(registered)} registered adapters; "
                         "register more adapters or lower the number of candidates.")
    if not train or not validation or not test:
        raise ValueError("Retriever training needs training, validation and test queries, got "
                         f"{len(train)}, {len(validation)} and {len(test)}.")
    settings = settings or TrainingSettings()

    scored = teacher_examples(engine, list(train) + list(validation), candidates, cache=cache)
    training, held_out = scored[:len(train)], scored[len(train):]
    table = KeyTable.from_store(engine.store)
    domain_of = {adapter_id: record.domain for adapter_id, record in registered.items()}

    heads: dict[str, QueryHead | None] = {"untrained": None}
    curves, grid = [], []
    for variant in variants:
        temperatures = retriever_temperatures if variant != "supervised" else retriever_temperatures[:1]
        best = None
        for temperature in temperatures:
            trial = replace(settings, variant=variant, retriever_temperature=temperature)
            head, curve = train_head(training, table, domain_of, engine.encoder.encoder_id, trial, held_out)
            accuracy = curve.validation_accuracy[curve.best_epoch - 1]
            used = temperature if variant != "supervised" else None  # the supervised loss has its own temperature
            grid.append({"variant": variant, "retriever_temperature": used, "best_epoch": curve.best_epoch,
                         "validation_acc@1": accuracy})
            if best is None or accuracy > best[0]:
                best = (accuracy, head, curve)
        heads[variant] = best[1]
        curves.append(best[2])
    grid.append({"variant": "untrained", "retriever_temperature": None, "best_epoch": 0,
                 "validation_acc@1": routing_accuracy(None, table, held_out, domain_of)["acc@1"]})

    lm_trained = [curve for curve in curves if curve.variant != "supervised"] or curves
    chosen = max(lm_trained, key=lambda curve: curve.validation_accuracy[curve.best_epoch - 1]).variant
    reports = evaluate_heads(engine, heads, test, table, domain_of)
    routing_only = {}
    if routing_test:
        embeddings = engine.encoder.encode([example.prompt for example in routing_test]).clone()
        labelled = [TeacherExample(example.prompt, example.segment or "", embedding, [], torch.empty(0), torch.empty(0),
                                   0.0, 0.0, 0) for example, embedding in zip(routing_test, embeddings)]
        routing_only = {name: routing_accuracy(head, table, labelled, domain_of) | {"queries": len(labelled)}
                        for name, head in heads.items()}
    return RetrieverRun(heads, curves, reports, chosen, grid, routing_only, len(training), len(held_out), len(test),
                        candidates,
                        {"epochs": settings.epochs, "learning_rate": settings.learning_rate, "rank": settings.rank,
                         "teacher_temperature": settings.teacher_temperature,
                         "retriever_temperatures": list(retriever_temperatures),
                         "kept_retriever_temperature": {c.variant: _kept_temperature(grid, c) for c in curves}})


def _kept_temperature(grid: list[dict], curve: TrainingCurve) -> float | None:
    rows = [row for row in grid if row["variant"] == curve.variant]
    return max(rows, key=lambda row: row["validation_acc@1"])["retriever_temperature"]


def report_markdown(report: dict) -> str:
    """Render a `RetrieverRun.to_json()` report as Markdown tables: test metrics, then the training curves."""
    lines = ["| retriever | acc@1 | acc@3 | MRR | acc@1 without own expert | acc@3 without own expert | "
             "merged NLL (top-3) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in report["test"].items():
        routing, without = row["routing"], row["without_own_expert"]
        marker = " (shipped)" if name == report["chosen"] else ""
        lines.append(f"| {name}{marker} | {routing['acc@1']:.3f} | {routing['acc@3']:.3f} | {routing['mrr']:.3f} | "
                     f"{without['acc@1']:.3f} | {without['acc@3']:.3f} | {row['merged_nll']:.3f} |")
    lines += ["", "| variant | kept epoch | train loss (first → kept) | validation loss (kept) | "
              "validation acc@1 (kept) |", "| --- | --- | --- | --- | --- |"]
    for variant, curve in report["curves"].items():
        best = curve["best_epoch"]
        lines.append(f"| {variant} | {best} | {curve['loss'][0]:.4f} → {curve['loss'][best - 1]:.4f} | "
                     f"{curve['validation_loss'][best - 1]:.4f} | {curve['validation_acc@1'][best - 1]:.3f} |")
    if report.get("routing_only"):
        lines += ["", "| retriever | queries | acc@1 | acc@3 | MRR |", "| --- | --- | --- | --- | --- |"]
        for name, row in report["routing_only"].items():
            lines.append(f"| {name} | {row['queries']} | {row['acc@1']:.3f} | {row['acc@3']:.3f} | {row['mrr']:.3f} |")
    lines += ["", "| variant | T_s | kept epoch | validation acc@1 |", "| --- | --- | --- | --- |"]
    for row in report.get("grid", []):
        temperature = "n/a" if row["retriever_temperature"] is None else f"{row['retriever_temperature']:g}"
        lines.append(f"| {row['variant']} | {temperature} | {row['best_epoch']} | {row['validation_acc@1']:.3f} |")
    return "\n".join(lines)
