"""`moa bench-scale`: registration throughput, query latency and memory with many generated adapters.

The adapters are small but valid PEFT folders for the base model: rank 1 on one Linear module,
with random weights and one random retrieval key each, written to a scratch folder and indexed
into a scratch store. The measurements then show how registration and retrieval grow with the
library, and that memory stays bounded while queries touch ever more adapters, because adapter
weights load lazily behind the LRU cache (`MoAConfig.adapter_cache_size`).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from .adapters import CONFIG_FILE, METADATA_FILE, WEIGHTS_FILE, save_keys
from .config import MoAConfig, RouteSettings
from .encoder import Encoder
from .engine import MoA
from .models import BaseModel
from .store import AdapterStore

logger = logging.getLogger(__name__)

SYNTHETIC_PREFIX = "synthetic-"
WEIGHT_SCALE = 1e-3
"""Standard deviation of the generated LoRA factors, small so that merged mixes barely move the model."""
MEMORY_CHECKPOINTS = 10
"""How many times the memory curve samples the resident memory while adapters load."""


@dataclass
class ScaleSettings:
    """Sizes of the generated library and of the measurements made by `run_scale_bench`."""

    adapters: int = 10_000
    """Number of generated adapters."""
    rank: int = 1
    """LoRA rank of each generated adapter."""
    target_module: str | None = None
    """Full name of the Linear module each adapter targets; None picks the first attention query projection."""
    retrieval_queries: int = 200
    """Queries timed through embedding and the store's top-k."""
    route_queries: int = 20
    """Queries timed through the whole loop (one iteration with contributions)."""
    max_new_tokens: int = 8
    """Tokens generated per routed query."""
    top_k: int = 3
    """Adapters retrieved and merged per query."""
    seed: int = 0
    """Seed of the generated weights and keys."""

    def __post_init__(self) -> None:
        for name in ("adapters", "rank", "retrieval_queries", "route_queries", "max_new_tokens", "top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")


@dataclass
class MemoryPoint:
    """Resident memory after the weights of `loaded` distinct adapters went through the cache."""

    loaded: int
    resident_mib: float
    cached_adapters: int
    cached_infos: int


@dataclass
class ScaleResult:
    """Every measurement of one run: named figures, and the memory curve while adapters load."""

    settings: ScaleSettings
    target_module: str
    cache_capacity: int
    rows: dict[str, float] = field(default_factory=dict)
    memory: list[MemoryPoint] = field(default_factory=list)


def resident_mib() -> float:
    """Current resident memory of this process in MiB, from /proc (Linux); elsewhere the peak so far."""
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except OSError:
        # NOTE: without /proc this is the peak, so a curve measured here can only rise
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def percentile(samples: list[float], fraction: float) -> float:
    """Return the nearest-rank percentile: the sample at `fraction` of the sorted samples."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


def default_target_module(module_shapes: dict[str, tuple[int, int]]) -> str:
    for name in sorted(module_shapes):
        if name.endswith("self_attn.q_proj"):
            return name
    raise ValueError("The base model has no self_attn.q_proj module; pass target_module explicitly.")


def generate_adapters(folder: Path, settings: ScaleSettings, base_model_id: str, target_module: str,
                      shape: tuple[int, int], encoder: Encoder) -> list[Path]:
    """Write `settings.adapters` valid PEFT folders, each with one random unit key for `encoder`."""
    in_features, out_features = shape
    generator = torch.Generator().manual_seed(settings.seed)
    width = len(str(settings.adapters - 1))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_id,
              "r": settings.rank, "lora_alpha": 2 * settings.rank, "target_modules": [target_module],
              "use_dora": False, "use_rslora": False}
    prefix = f"base_model.model.{target_module}"
    folders = []
    for index in range(settings.adapters):
        adapter = folder / f"{SYNTHETIC_PREFIX}{index:0{width}d}"
        adapter.mkdir(parents=True)
        (adapter / CONFIG_FILE).write_text(json.dumps(config))
        tensors = {f"{prefix}.lora_A.weight": torch.randn(settings.rank, in_features, generator=generator) * WEIGHT_SCALE,
                   f"{prefix}.lora_B.weight": torch.randn(out_features, settings.rank, generator=generator) * WEIGHT_SCALE}
        save_file(tensors, str(adapter / WEIGHTS_FILE))
        (adapter / METADATA_FILE).write_text(json.dumps({"name": adapter.name, "domain": "synthetic",
                                                         "description": f"Generated adapter number {index}"}))
        key = torch.nn.functional.normalize(torch.randn(1, encoder.dim, generator=generator), dim=-1)
        save_keys(adapter, key, encoder.encoder_id)
        folders.append(adapter)
    return folders


def _timed_ms(function: Callable[[], object]) -> tuple[float, float]:
    """Run `function`; return its wall-clock time and this process's CPU time (all threads), in ms.

    CPU time stays comparable when other processes compete for the cores; wall-clock time does not.
    """
    started, started_cpu = time.perf_counter(), time.process_time()
    function()
    return (time.perf_counter() - started) * 1000, (time.process_time() - started_cpu) * 1000


class ScaleBench:
    """Generates the library, registers it, and runs the measurements on one engine."""

    def __init__(self, base: BaseModel, encoder: Encoder, config: MoAConfig, workdir: Path,
                 settings: ScaleSettings) -> None:
        self.settings = settings
        self.workdir = Path(workdir)
        store = AdapterStore.open(base.model_id, encoder.encoder_id, self.workdir / "store")
        self.engine = MoA(config, base, encoder, store)
        self.target_module = settings.target_module or default_target_module(self.engine.module_shapes)
        if self.target_module not in self.engine.module_shapes:
            raise ValueError(f"target_module {self.target_module!r} is not a Linear module of {base.model_id!r}.")
        self.result = ScaleResult(settings, self.target_module, config.adapter_cache_size)

    def record(self, name: str, value: float) -> None:
        self.result.rows[name] = value
        logger.info("%s: %.3f", name, value)

    def record_latency(self, name: str, samples: list[tuple[float, float]]) -> None:
        """Record the median and p95 wall-clock times and the median CPU time of (wall, CPU) samples in ms."""
        wall = [sample[0] for sample in samples]
        self.record(f"{name}, median (ms)", statistics.median(wall))
        self.record(f"{name}, p95 (ms)", percentile(wall, 0.95))
        self.record(f"{name}, median CPU time (ms)", statistics.median(sample[1] for sample in samples))

    def register(self) -> None:
        engine, settings = self.engine, self.settings
        self.record("resident memory, models loaded (MiB)", resident_mib())
        library = self.workdir / "adapters"
        started = time.perf_counter()
        generate_adapters(library, settings, engine.base.model_id, self.target_module,
                          engine.module_shapes[self.target_module], engine.encoder)
        self.record("generate adapters (s)", time.perf_counter() - started)

        started = time.perf_counter()
        report = engine.index(library)
        seconds = time.perf_counter() - started
        if len(report.added) != settings.adapters:
            raise RuntimeError(f"Registered {len(report.added)} of {settings.adapters} generated adapters.")
        self.record("moa index, new adapters (s)", seconds)
        self.record("registration throughput (adapters/s)", settings.adapters / seconds)
        started = time.perf_counter()
        engine.index(library)
        self.record("moa index again, nothing changed (s)", time.perf_counter() - started)
        self.record("count registered adapters (ms)", _timed_ms(engine.store.count)[0])
        self.record("resident memory, after registration (MiB)", resident_mib())

    def query_latency(self) -> None:
        engine, settings = self.engine, self.settings
        texts = [f"Question {number}: what does generated adapter {number * 7919 % settings.adapters} know?"
                 for number in range(max(settings.retrieval_queries, settings.route_queries))]
        engine.retrieve(texts[0], settings.top_k)  # warm-up: the first query builds the index in memory
        retrieval = [_timed_ms(lambda text=text: engine.retrieve(text, settings.top_k))
                     for text in texts[:settings.retrieval_queries]]
        self.record_latency("retrieve top-k", retrieval)

        route_settings = RouteSettings(top_k=settings.top_k, max_new_tokens=settings.max_new_tokens,
                                       max_iterations=1)
        routed = [_timed_ms(lambda text=text: engine.route(text, route_settings))
                  for text in texts[:settings.route_queries]]
        self.record_latency(f"route, {settings.max_new_tokens} new tokens", routed)
        self.record("resident memory, after routed queries (MiB)", resident_mib())

    def memory_curve(self) -> None:
        """Load every registered adapter's weights once, in order, as ever new queries would, sampling memory."""
        engine = self.engine
        records = list(engine.store.adapters().values())
        every = max(1, len(records) // MEMORY_CHECKPOINTS)
        self._sample_memory(0)
        for loaded, record in enumerate(records, start=1):
            engine.load_weights([record])
            if loaded % every == 0 or loaded == len(records):
                self._sample_memory(loaded)
        in_features, out_features = engine.module_shapes[self.target_module]
        all_weights_mib = len(records) * self.settings.rank * (in_features + out_features) * 4 / 2**20
        self.record("weights of every adapter, float32 (MiB)", all_weights_mib)
        self.record("peak resident memory (MiB)", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)

    def _sample_memory(self, loaded: int) -> None:
        point = MemoryPoint(loaded, resident_mib(), len(self.engine.cache), len(self.engine.adapter_infos))
        self.result.memory.append(point)
        logger.info("memory after %d adapters loaded: %.1f MiB", loaded, point.resident_mib)


def run_scale_bench(base: BaseModel, encoder: Encoder, config: MoAConfig, workdir: Path,
                    settings: ScaleSettings | None = None) -> ScaleResult:
    """Generate and register the adapters in `workdir`, then measure latency and memory."""
    bench = ScaleBench(base, encoder, config, workdir, settings or ScaleSettings())
    bench.register()
    bench.query_latency()
    bench.memory_curve()
    return bench.result


def markdown(result: ScaleResult, command: str, machine: str) -> str:
    settings = result.settings
    lines = [f"Command: `{command}`", "", f"Machine: {machine}; {machine_memory()}", "",
             f"{settings.adapters} generated adapters, rank {settings.rank} on `{result.target_module}`, one random "
             f"key each; top-k {settings.top_k}; adapter cache of {result.cache_capacity}. Latencies over "
             f"{settings.retrieval_queries} retrievals and {settings.route_queries} routed queries (one iteration, "
             f"{settings.max_new_tokens} new tokens, with contributions).", "",
             "| measurement | value |", "|---|---:|"]
    lines += [f"| {name} | {value:.3f} |" for name, value in result.rows.items()]
    lines += ["", "Resident memory while the weights of every adapter load once through the cache:", "",
              "| adapters loaded | resident memory (MiB) | adapters in the weight cache | adapter records cached |",
              "|---:|---:|---:|---:|"]
    lines += [f"| {point.loaded} | {point.resident_mib:.1f} | {point.cached_adapters} | {point.cached_infos} |"
              for point in result.memory]
    return "\n".join(lines)


def bench_scale(config: MoAConfig, settings: ScaleSettings, scratch_parent: Path | None = None) -> ScaleResult:
    """Load the configured models and run the scale bench in a scratch folder that is deleted afterwards."""
    import tempfile

    from .models import load_base_model

    base = load_base_model(config.base_model, config.device, config.dtype, config.model_cache_dir)
    encoder = Encoder(config.encoder, device=base.device)
    with tempfile.TemporaryDirectory(prefix="moa-scale-", dir=scratch_parent) as scratch:
        return run_scale_bench(base, encoder, config, Path(scratch), settings)


def machine_memory() -> str:
    """CPU cores and physical memory, e.g. "2 CPU cores, 23.4 GiB memory"."""
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} CPU cores, {memory_gib:.1f} GiB memory"
