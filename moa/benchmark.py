"""`moa bench`: the latency of each stage, always beside the base model's plain generation.

Every number is the median of `repeats` runs. Ratios compare against figures measured in the
same process, so they hold across machines better than the absolute times do.
"""

from __future__ import annotations

import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import RouteSettings
from .contribution import compute_contributions
from .engine import MoA
from .error import teacher_forced_errors
from .generation import chat_prompt_ids, generate
from .store import AdapterStore
from .weighting import relevance_weights

BENCH_QUERY = "What is the chemistry of baking soda in a cake?"


@dataclass
class Goal:
    name: str
    target: str
    measured: str
    met: bool


@dataclass
class BenchResult:
    rows: dict[str, float] = field(default_factory=dict)  # name -> milliseconds or ratio
    goals: list[Goal] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def median_ms(function: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        function()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def machine_description() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {torch.get_num_threads()} torch threads, {device}; Python {platform.python_version()}, "
            f"torch {torch.__version__}")


class Bench:
    def __init__(self, engine: MoA, repeats: int) -> None:
        self.engine = engine
        self.repeats = repeats
        self.result = BenchResult()
        self.prompt_ids = chat_prompt_ids(engine.base.tokenizer, BENCH_QUERY)
        records = list(engine.store.adapters().values())
        if len(records) < 5:
            raise ValueError(f"moa bench needs at least 5 registered adapters, found {len(records)}.")
        self.records = records

    def record(self, name: str, value: float) -> float:
        self.result.rows[name] = value
        return value

    def routing_stages(self) -> None:
        engine = self.engine
        embedding = engine.embed_query(BENCH_QUERY)
        self.record("encode query (ms)", median_ms(lambda: engine.embed_query(BENCH_QUERY), self.repeats))
        self.record("Chroma top-k, library (ms)", median_ms(lambda: engine.store.query(embedding, 3), self.repeats))
        similarities = torch.tensor([0.5, 0.4, 0.3])
        self.record("relevance weights (ms)", median_ms(lambda: relevance_weights(similarities, "softmax", 0.1), self.repeats))

        info = engine.adapter_info(self.records[0])

        def cold_load() -> None:
            engine.cache.clear()
            engine.cache.get(info)

        self.record("adapter load, cold (ms)", median_ms(cold_load, self.repeats))
        self.record("adapter load, warm (ms)", median_ms(lambda: engine.cache.get(info), self.repeats))

    def _plain_generate(self, tokens: int) -> None:
        model, tokenizer = self.engine.base.model, self.engine.base.tokenizer
        ids = self.prompt_ids.unsqueeze(0).to(self.engine.base.device)
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                           do_sample=False, pad_token_id=tokenizer.pad_token_id)

    def generation(self, tokens: int) -> None:
        base_ms = self.record(f"base model.generate, {tokens} tokens (ms)",
                              median_ms(lambda: self._plain_generate(tokens), self.repeats))
        base_rate = tokens / base_ms * 1000
        self.record("base tokens/s", base_rate)
        adapters = self.engine.load_weights(self.records[:5])
        for k in (1, 3, 5):
            weights = torch.full((1, k), 1.0 / k)
            for path in ("merged", "unmerged"):
                elapsed = median_ms(lambda: self._generate_exact(adapters[:k], weights, path, tokens), self.repeats)
                self.record(f"k={k} {path} tokens/s", tokens / elapsed * 1000)
                self.record(f"k={k} {path} / base tokens/s", (tokens / elapsed * 1000) / base_rate)

    def _generate_exact(self, adapters, weights, path, tokens):
        model, tokenizer = self.engine.base.model, self.engine.base.tokenizer
        context = self.engine.mixer.merged if path == "merged" else self.engine.mixer.unmerged
        with context(adapters, weights):
            generate_fixed(model, tokenizer, self.prompt_ids, tokens)

    def break_even(self) -> None:
        """Generation length above which merging into the weights beats the unmerged hooks (k = 3)."""
        adapters = self.engine.load_weights(self.records[:3])
        weights = torch.full((1, 3), 1.0 / 3)

        def merge_and_restore() -> None:
            with self.engine.mixer.merged(adapters, weights):
                pass

        merge_ms = self.record("merge + restore, k=3 (ms)", median_ms(merge_and_restore, self.repeats))
        short, long = 8, 40
        per_token = {}
        for path in ("merged", "unmerged"):
            t_short = median_ms(lambda: self._generate_exact(adapters, weights, path, short), self.repeats)
            t_long = median_ms(lambda: self._generate_exact(adapters, weights, path, long), self.repeats)
            per_token[path] = (t_long - t_short) / (long - short)
            self.record(f"{path} ms/token, k=3", per_token[path])
        # the merged path's per-token time excludes merging, which happens once per generation
        saving = per_token["unmerged"] - per_token["merged"]
        self.record("break-even length, k=3 (tokens)", merge_ms / saving if saving > 0 else float("inf"))

    def scoring(self) -> None:
        engine = self.engine
        model, device = engine.base.model, engine.base.device
        target = generate_fixed(model, engine.base.tokenizer, self.prompt_ids, 64).token_ids
        one_pass = self.record("forward pass, prompt + 64 tokens (ms)", median_ms(
            lambda: teacher_forced_errors(model, self.prompt_ids.to(device), target.to(device), "surprisal"),
            self.repeats))
        adapters = engine.load_weights(self.records[:3])
        weights = torch.tensor([0.5, 0.3, 0.2])
        batched = self.record("leave-one-out batched, k=3 (ms)", median_ms(
            lambda: compute_contributions(model, engine.mixer, adapters, weights, self.prompt_ids, target, "surprisal"),
            self.repeats))

        def sequential() -> None:
            from .weighting import leave_one_out_weights

            rows = torch.cat([leave_one_out_weights(weights), torch.zeros(1, 3)])
            for row in rows:
                with engine.mixer.unmerged(adapters, row):
                    teacher_forced_errors(model, self.prompt_ids.to(device), target.to(device), "surprisal")

        sequential_ms = self.record("leave-one-out sequential, k=3 (ms)", median_ms(sequential, self.repeats))
        self.record("leave-one-out batched / one forward pass", batched / one_pass)
        self.record("leave-one-out batched / sequential", batched / sequential_ms)

    def chroma_scale(self, sizes: tuple[int, ...]) -> None:
        dim = self.engine.encoder.dim
        for size in sizes:
            with tempfile.TemporaryDirectory() as folder:
                store = AdapterStore.open("bench-model", "bench-encoder", Path(folder))
                generator = torch.Generator().manual_seed(size)
                vectors = torch.nn.functional.normalize(torch.randn(size, dim, generator=generator), dim=-1)
                ids = [f"synthetic-{i}#0" for i in range(size)]
                metadata = [{"adapter_id": f"synthetic-{i}", "key_index": 0} for i in range(size)]
                started = time.perf_counter()
                batch = store.client.get_max_batch_size()
                for start in range(0, size, batch):
                    store.collection.add(ids=ids[start:start + batch], embeddings=vectors[start:start + batch].numpy(),
                                         metadatas=metadata[start:start + batch])
                self.record(f"Chroma add {size} keys (s)", time.perf_counter() - started)
                query = torch.nn.functional.normalize(torch.randn(dim, generator=generator), dim=0).tolist()
                self.record(f"Chroma top-5 p50 at {size} keys (ms)", median_ms(
                    lambda: store.collection.query(query_embeddings=[query], n_results=20), max(self.repeats, 20)))

    def cold_start(self, config) -> None:
        from .models import load_base_model

        started = time.perf_counter()
        load_base_model(config.base_model, config.device, config.dtype, config.model_cache_dir)
        self.record("cold start with weights cache (s)", time.perf_counter() - started)
        with tempfile.TemporaryDirectory() as cache:
            started = time.perf_counter()
            load_base_model(config.base_model, config.device, config.dtype, Path(cache))
            self.record("cold start without weights cache (s)", time.perf_counter() - started)

    def peak_memory(self) -> None:
        self.record("peak resident memory (MiB)", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        if torch.cuda.is_available():
            self.record("peak CUDA memory (MiB)", torch.cuda.max_memory_allocated() / 2**20)

    def goals(self) -> None:
        rows, goals = self.result.rows, self.result.goals
        merged = min(rows[f"k={k} merged / base tokens/s"] for k in (1, 3, 5))
        goals.append(Goal("merged generation speed", ">= 0.95 x base tokens/s", f"{merged:.2f} x (worst of k=1,3,5)",
                          merged >= 0.95))
        routing_ms = (rows["encode query (ms)"] + rows["Chroma top-k, library (ms)"] + rows["relevance weights (ms)"]
                      + 3 * rows["adapter load, warm (ms)"] + rows["merge + restore, k=3 (ms)"])
        generation_ms = 64 / rows["base tokens/s"] * 1000
        share = routing_ms / generation_ms
        goals.append(Goal("routing overhead", "<= 3 % of a 64-token generation",
                          f"{100 * share:.1f} % ({routing_ms:.1f} ms of {generation_ms:.0f} ms)", share <= 0.03))
        switch = 3 * rows["adapter load, warm (ms)"] + rows["merge + restore, k=3 (ms)"]
        goals.append(Goal("warm adapter switch", "<= 20 ms", f"{switch:.1f} ms (3 cache hits + merge + restore)",
                          switch <= 20))
        loo = rows["leave-one-out batched / one forward pass"]
        goals.append(Goal("leave-one-out", "<= 1.5 x one forward pass", f"{loo:.2f} x (k=3, 8 rows)", loo <= 1.5))
        chroma = rows.get("Chroma top-5 p50 at 100000 keys (ms)")
        if chroma is not None:
            goals.append(Goal("Chroma p50 at 100k keys", "<= 10 ms", f"{chroma:.1f} ms", chroma <= 10))
        cold = rows["cold start with weights cache (s)"]
        goals.append(Goal("cold start", "<= 10 s", f"{cold:.1f} s with the cache", cold <= 10))


def generate_fixed(model, tokenizer, prompt_ids: torch.Tensor, tokens: int):
    """Generate exactly `tokens` tokens, not stopping at the end-of-turn token, for timing."""
    return generate(model, tokenizer, prompt_ids, tokens, stop_at_eos=False)


STAGES = ("routing", "generation", "break_even", "scoring", "chroma", "cold_start")


def run_bench(engine: MoA, config, repeats: int = 5, chroma_sizes: tuple[int, ...] = (1_000, 10_000, 100_000),
              tokens: int = 64, stages: tuple[str, ...] = STAGES) -> BenchResult:
    """Run the named stages; the goals are judged only when every stage ran."""
    unknown = [stage for stage in stages if stage not in STAGES]
    if unknown:
        raise ValueError(f"Unknown bench stage(s) {unknown}; choose from {', '.join(STAGES)}.")
    bench = Bench(engine, repeats)
    runners = {"routing": bench.routing_stages, "generation": lambda: bench.generation(tokens),
               "break_even": bench.break_even, "scoring": bench.scoring,
               "chroma": lambda: bench.chroma_scale(chroma_sizes), "cold_start": lambda: bench.cold_start(config)}
    for stage in STAGES:
        if stage in stages:
            runners[stage]()
    bench.peak_memory()
    if set(stages) == set(STAGES):
        bench.goals()
    return bench.result


def markdown(result: BenchResult, command: str, machine: str, repeats: int) -> str:
    lines = [f"Command: `{command}`", "", f"Machine: {machine}", "", f"Each figure is the median of {repeats} runs.", "",
             "| goal | target | measured | met |", "|---|---|---|:-:|"]
    for goal in result.goals:
        lines.append(f"| {goal.name} | {goal.target} | {goal.measured} | {'yes' if goal.met else 'no'} |")
    lines += ["", "| measurement | value |", "|---|---:|"]
    for name, value in result.rows.items():
        lines.append(f"| {name} | {value:.3f} |")
    return "\n".join(lines)
