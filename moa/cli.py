"""The `moa` command line: query, index, list, remove, build-corpus and train-experts."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import ERROR_METRICS, EXECUTION_PATHS, WEIGHTINGS, ConfigError, MoAConfig, RouteSettings

EXIT_USAGE = 2


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit code 2."""


def _add_global_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("models and store (defaults: moa.toml, then MOA_* variables)")
    group.add_argument("--base-model", help="causal LM: hub id, folder, .gguf file, or 'default' (bundled SmolLM2)")
    group.add_argument("--encoder", help="retriever encoder: hub id, folder, or 'default' (bundled all-MiniLM-L6-v2)")
    group.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where the models run (default auto)")
    group.add_argument("--store", dest="store_path", help="Chroma store folder (default ~/.cache/moa/store)")
    group.add_argument("--chroma-url", help="Chroma server URL, e.g. http://127.0.0.1:8000, instead of a local store")
    group.add_argument("--adapters-dir",
                       help="library indexed into an empty store on first use (default: adapters/ in the repository)")
    group.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")


def _add_route_options(parser: argparse.ArgumentParser) -> None:
    defaults = RouteSettings()
    parser.add_argument("--reference", help="reference answer; the error becomes its per-token NLL")
    parser.add_argument("--top-k", type=int, default=defaults.top_k, help="adapters retrieved in the first iteration")
    parser.add_argument("--temperature", type=float, default=defaults.temperature,
                        help="softmax temperature from similarity to merge weight (lower is sharper)")
    parser.add_argument("--weighting", choices=WEIGHTINGS, default=defaults.weighting, help="similarity-to-weight rule")
    parser.add_argument("--min-similarity", type=float, default=defaults.min_similarity,
                        help="adapters below this cosine similarity are not used")
    parser.add_argument("--threshold", type=float, default=defaults.threshold,
                        help="mean per-token error (nats) below which the answer is accepted")
    parser.add_argument("--max-iterations", type=int, default=defaults.max_iterations, help="refinement rounds at most")
    parser.add_argument("--merge", dest="merge_method", default=defaults.merge_method,
                        help="merge method: exact (default), cat, linear, svd, ties, dare_linear, dare_ties, magnitude_prune")
    parser.add_argument("--strategy", default=defaults.strategy, help="refinement: widen, reweight, drop, requery, chain")
    parser.add_argument("--metric", dest="error_metric", choices=ERROR_METRICS + ("auto",), default=defaults.error_metric,
                        help="per-token error (auto: nll with --reference, else surprisal)")
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens, help="tokens generated per iteration")
    parser.add_argument("--sample", dest="do_sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="sampling seed")
    parser.add_argument("--path", dest="execution_path", choices=EXECUTION_PATHS, default=defaults.execution_path,
                        help="unmerged (LoRA beside the weights), merged (into the weights) or auto")
    parser.add_argument("--untrained", action="store_true", help="retrieve with the plain encoder, not the trained head")
    parser.add_argument("--json", action="store_true", help="print the whole trace as one JSON object")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moa", description="Mixture of Adapters: route a language model through a "
                                                             "library of LoRA adapters.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    query = commands.add_parser("query", help="answer a query through the retrieve-merge-refine loop")
    query.add_argument("query", help="the question or instruction")
    _add_route_options(query)
    _add_global_options(query)

    index = commands.add_parser("index", help="make the store match a folder of PEFT adapter folders")
    index.add_argument("folder", help="folder whose sub-folders are PEFT LoRA adapters")
    index.add_argument("--skip-invalid", action="store_true", help="register the valid adapters and skip rejected ones")
    _add_global_options(index)

    listing = commands.add_parser("list", help="list registered adapters")
    listing.add_argument("--json", action="store_true", help="print JSON")
    _add_global_options(listing)

    importer = commands.add_parser("import", help="copy external PEFT adapters into the library and register them")
    importer.add_argument("source", help="a PEFT adapter folder, a folder of them, or a Hugging Face repo id")
    importer.add_argument("--id", dest="adapter_id", help="adapter id for a single adapter (default: its folder or "
                                                          "repo name)")
    importer.add_argument("--description", help="retrieval description written to the copy's moa.json (single adapter)")
    _add_global_options(importer)

    remove = commands.add_parser("remove", help="unregister adapters (their folders are kept)")
    remove.add_argument("ids", nargs="+", metavar="ID", help="adapter id as shown by `moa list`")
    _add_global_options(remove)

    corpus = commands.add_parser("build-corpus", help="build the WordNet + FreeDict training corpus")
    corpus.add_argument("--out", default="data/corpus", help="output folder (default data/corpus)")
    corpus.add_argument("--max-terms", type=int, default=1500, help="terms per segment at most")
    corpus.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")

    experts = commands.add_parser("train-experts", help="train one LoRA expert per corpus segment (resumable)")
    experts.add_argument("--corpus", default="data/corpus", help="corpus folder from build-corpus, or a JSONL file")
    experts.add_argument("--out", default="adapters", help="where expert folders are written (default adapters)")
    experts.add_argument("--runs", default="runs", help="checkpoints and loss logs (default runs)")
    experts.add_argument("--segments", default="label",
                         help="'label' (one expert per label) or K for balanced k-means into K segments")
    experts.add_argument("--domains", nargs="*", help="labels to train, in order (default: the 18 library domains); "
                                                      "with --segments K, the labels whose pairs are clustered")
    experts.add_argument("--steps", type=int, default=48, help="optimizer steps per expert")
    experts.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    experts.add_argument("--learning-rate", type=float, default=2e-3, help="peak AdamW learning rate")
    experts.add_argument("--rank", type=int, default=8, help="LoRA rank")
    experts.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha")
    experts.add_argument("--target-modules", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"],
                         help="Linear modules that get a LoRA")
    experts.add_argument("--keys-only", action="store_true",
                         help="recompute the retrieval keys of experts already trained (after a change of encoder "
                              "or key design) from the corpus they were trained on, without training or loading the "
                              "base model; the training options are ignored. Run `moa index` afterwards")
    _add_global_options(experts)

    report = commands.add_parser("library-report", help="measure the library's adapter x domain NLL matrix and routing")
    report.add_argument("--corpus", default="data/corpus", help="corpus folder from build-corpus")
    report.add_argument("--per-domain", type=int, default=24, help="held-out pairs per domain")
    report.add_argument("--library", help="measure this adapter folder in a scratch store (default: the registered library)")
    report.add_argument("--title", default="Label library", help="heatmap title")
    report.add_argument("--out", default="docs/library_report.json", help="JSON file with every number")
    report.add_argument("--matrix", default="docs/library_matrix.json", help="matrix JSON read by the app ('' skips)")
    report.add_argument("--heatmap", default="assets/library_heatmap.png", help="PNG heatmap of the NLL gains")
    report.add_argument("--domains", nargs="+", help="measure only these corpus domains (default: every domain)")
    _add_global_options(report)

    evaluate = commands.add_parser("eval", help="compare routing with base, uniform, random and oracle mixes")
    evaluate.add_argument("--queries", help="JSONL of {\"query\", \"reference\", \"domains\"?} (default: the corpus test split)")
    evaluate.add_argument("--corpus", default="data/corpus", help="corpus folder whose test split is used by default")
    evaluate.add_argument("--per-domain", type=int, default=8, help="test queries per domain when --queries is not given")
    evaluate.add_argument("--configs", nargs="+", default=None,
                          help="configurations to run (default all): base uniform random top1 topk topk_refine oracle "
                               "topk_untrained")
    evaluate.add_argument("--top-k", type=int, default=3, help="k for random, topk and topk_refine")
    evaluate.add_argument("--threshold", type=float, default=2.0, help="topk_refine: mean reference NLL to accept")
    evaluate.add_argument("--max-iterations", type=int, default=3, help="topk_refine: refinement rounds at most")
    evaluate.add_argument("--max-new-tokens", type=int, default=16, help="topk_refine: tokens generated per round")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object instead of a Markdown table")
    _add_global_options(evaluate)

    bench = commands.add_parser("bench", help="measure each stage's latency beside plain generation")
    bench.add_argument("--repeats", type=int, default=5, help="runs per measurement; the median is reported")
    bench.add_argument("--tokens", type=int, default=64, help="generation length for tokens/s")
    bench.add_argument("--chroma-sizes", type=int, nargs="*", default=[1_000, 10_000, 100_000],
                       help="synthetic key counts for the Chroma latency")
    bench.add_argument("--stages", nargs="+", default=None,
                       help="stages to run (default all): routing generation break_even scoring chroma cold_start")
    bench.add_argument("--out", default="docs/BENCHMARKS.md", help="Markdown file to write ('-' prints it)")
    _add_global_options(bench)

    scale = commands.add_parser("bench-scale", help="measure registration, query latency and memory with many "
                                                    "generated adapters",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    scale.add_argument("--adapters", type=int, default=10_000, help="number of generated adapters")
    scale.add_argument("--rank", type=int, default=1, help="LoRA rank of each generated adapter")
    scale.add_argument("--retrieval-queries", type=int, default=200, help="queries timed through retrieval alone")
    scale.add_argument("--route-queries", type=int, default=20, help="queries timed through the whole loop")
    scale.add_argument("--max-new-tokens", type=int, default=8, help="tokens generated per routed query")
    scale.add_argument("--cache-size", type=int, default=None, help="adapters kept by the LRU weight cache "
                                                                     "(default: the adapter_cache_size setting)")
    scale.add_argument("--scratch", default=None, help="folder for the generated adapters and store, deleted "
                                                      "afterwards (default: the system's temporary folder)")
    scale.add_argument("--out", default="docs/BENCHMARKS.md", help="Markdown file whose Scale section is replaced "
                                                                  "('-' prints it)")
    _add_global_options(scale)

    retriever = commands.add_parser("train-retriever", help="train the query side of the retriever from LM scores",
                                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    retriever.add_argument("--queries", help="JSONL of {\"query\", \"reference\", \"domains\"?} lines; the first "
                           "domain labels the query for the supervised baseline (default: corpus train split)")
    retriever.add_argument("--corpus", default="data/corpus", help="corpus folder (train split for training, test for the report)")
    retriever.add_argument("--per-domain", type=int, default=64, help="training queries per domain")
    retriever.add_argument("--validation-per-domain", type=int, default=6,
                           help="validation-split queries per domain, for picking epochs, T_s and the shipped variant")
    retriever.add_argument("--test-per-domain", type=int, default=8, help="test queries per domain for the report")
    retriever.add_argument("--routing-per-domain", type=int, default=100,
                           help="test queries per domain routed by the encoder alone, for tighter accuracy numbers")
    retriever.add_argument("--candidates", type=int, default=8, help="K adapters retrieved per query (>= 8)")
    retriever.add_argument("--variants", nargs="+", default=["pdist", "loop", "emdr", "supervised"],
                           choices=["pdist", "loop", "emdr", "supervised"], help="losses to train and compare")
    retriever.add_argument("--epochs", type=int, default=40, help="passes over the teacher-scored queries")
    retriever.add_argument("--learning-rate", type=float, default=1e-3, help="AdamW learning rate of the head")
    retriever.add_argument("--rank", type=int, default=16, help="rank of the head's residual map (0: dense)")
    retriever.add_argument("--teacher-temperature", type=float, default=0.01, help="T_g of the target distribution")
    retriever.add_argument("--retriever-temperature", type=float, nargs="+", default=[0.01, 0.05],
                           help="T_s of the retriever distribution; with several, each variant keeps the best on "
                                "validation")
    retriever.add_argument("--out", default=None, help="where the best head is saved (default retriever/query_head.safetensors)")
    retriever.add_argument("--report", default="docs/retriever_report.json", help="JSON file with every number")
    retriever.add_argument("--curves", default="assets/retriever_curves.png", help="PNG of the training curves")
    retriever.add_argument("--cache", default="runs/retriever/teacher.pt",
                           help="teacher scores saved as they are computed, so a stopped run resumes ('' to disable)")
    _add_global_options(retriever)
    return parser


def _config(args: argparse.Namespace) -> MoAConfig:
    return MoAConfig.load(**{name: getattr(args, name, None) for name in
                             ("base_model", "encoder", "device", "store_path", "chroma_url", "adapters_dir")})


def _settings(args: argparse.Namespace) -> RouteSettings:
    names = ("top_k", "temperature", "weighting", "min_similarity", "threshold", "max_iterations", "merge_method",
             "strategy", "error_metric", "max_new_tokens", "do_sample", "seed", "execution_path")
    return RouteSettings(**{name: getattr(args, name) for name in names}, use_trained_retriever=not args.untrained)


def run_query(args: argparse.Namespace) -> None:
    from .engine import MoA, clean_query

    settings = _settings(args)  # check the options and the query before loading any model
    config = _config(args)
    clean_query(args.query, config.max_query_chars)
    engine = MoA.from_config(config)
    stream = None if args.json else (lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
    if stream:
        print("Generating: ", end="", flush=True)
    trace = engine.route(args.query, settings, reference=args.reference, on_token=stream)
    if args.json:
        print(json.dumps(trace.to_dict(), ensure_ascii=False))
        return
    print("\n")
    if settings.use_trained_retriever and engine.query_head is not None:
        print(f"Retriever: trained query head ({engine.query_head.variant or 'unknown variant'})")
    else:
        print("Retriever: plain encoder")
    print_trace(trace)


def print_trace(trace) -> None:
    for iteration in trace.iterations:
        marker = " (final)" if iteration.index == trace.final_iteration else ""
        print(f"Iteration {iteration.index + 1}{marker}: mean {iteration.error_metric} {iteration.mean_error:.3f} "
              f"[threshold {iteration.threshold:.3f}] -> {iteration.decision}: {iteration.reason}")
        if not iteration.adapters:
            print("    no adapter: base model alone")
        for rank, adapter in enumerate(iteration.adapters, start=1):
            contribution = "" if adapter.contribution is None else f"  contribution {adapter.contribution:+.4f}"
            print(f"    {rank}. {adapter.id:<16} {adapter.domain:<12} similarity {adapter.similarity:.3f}  "
                  f"weight {adapter.weight:.3f}{contribution}")
        print(f"    answer: {iteration.answer}")
    print(f"\nAnswer: {trace.final_answer}\nStopped because: {trace.stopped_because}")


def run_index(args: argparse.Namespace) -> None:
    from .engine import MoA

    engine = MoA.from_config(_config(args), index_default_library=False)
    report = engine.index(Path(args.folder), skip_invalid=args.skip_invalid)
    print(f"added {len(report.added)}, updated {len(report.updated)}, removed {len(report.removed)}, "
          f"unchanged {len(report.unchanged)}")
    _print_ids((("added", report.added), ("updated", report.updated), ("removed", report.removed)))


def run_import(args: argparse.Namespace) -> None:
    from .engine import MoA

    engine = MoA.from_config(_config(args), index_default_library=False)
    report = engine.import_adapters(args.source, args.adapter_id, args.description)
    print(f"imported {len(report.imported)} into {report.library}, unchanged {len(report.unchanged)}")
    _print_ids((("imported", report.imported), ("unchanged", report.unchanged)))


def _print_ids(groups: Sequence[tuple[str, Sequence[str]]]) -> None:
    """Print one indented line of adapter ids per non-empty group."""
    for label, ids in groups:
        if ids:
            print(f"  {label}: {', '.join(ids)}")


def _open_store(args: argparse.Namespace):
    """Open the store without loading the base model: ids come from the resolved model and encoder names."""
    from .encoder import resolve_encoder
    from .models import resolve_model_source
    from .store import AdapterStore

    config = _config(args)
    model_id = resolve_model_source(config.base_model).model_id
    encoder_id, _ = resolve_encoder(config.encoder)
    return AdapterStore.open(model_id, encoder_id, config.store_path, config.chroma_url)


def run_list(args: argparse.Namespace) -> None:
    records = _open_store(args).adapters()
    if args.json:
        print(json.dumps([record.__dict__ for record in records.values()], ensure_ascii=False))
        return
    if not records:
        print("No adapters registered. Run `moa index FOLDER`, or `moa query` to index the default library.")
        return
    print(f"{'id':<20} {'domain':<12} {'rank':>4} {'alpha':>6}  description")
    for record in records.values():
        print(f"{record.adapter_id:<20} {record.domain:<12} {record.rank:>4} {record.alpha:>6g}  {record.description[:60]}")


def run_remove(args: argparse.Namespace) -> None:
    _open_store(args).remove(args.ids)
    print(f"removed {', '.join(args.ids)}")


def run_build_corpus(args: argparse.Namespace) -> None:
    from .corpus import build_corpus

    paths = build_corpus(args.out, max_terms_per_segment=args.max_terms)
    stats = json.loads(Path(paths["stats"]).read_text()) if "stats" in paths else {}
    print(json.dumps(stats, indent=1) if stats else "\n".join(str(p) for p in paths.values()))


def run_train_experts(args: argparse.Namespace) -> None:
    from .encoder import Encoder
    from .experts import LIBRARY_DOMAINS, kmeans_segments, label_segments, load_splits, rekey_library, train_library
    from .models import load_base_model, resolve_device
    from .training import TrainingConfig

    config = _config(args)
    training = TrainingConfig(rank=args.rank, alpha=args.alpha, target_modules=tuple(args.target_modules),
                              steps=args.steps, learning_rate=args.learning_rate, batch_size=args.batch_size)
    splits = load_splits(Path(args.corpus))
    base = None if args.keys_only else load_base_model(config.base_model, config.device, config.dtype,
                                                       config.model_cache_dir)
    encoder = Encoder(config.encoder, device=resolve_device(config.device, config.dtype)[0])
    if args.segments == "label":
        segments = label_segments(splits, encoder, args.domains or LIBRARY_DOMAINS)
    else:
        try:
            k = int(args.segments)
        except ValueError:
            raise CommandError(f"--segments must be 'label' or a number of clusters, got {args.segments!r}.") from None
        segments = kmeans_segments(splits, k, encoder, domains=args.domains)
    if args.keys_only:
        try:
            folders = rekey_library(encoder, segments, Path(args.out))
        except (FileNotFoundError, ValueError) as error:
            raise CommandError(str(error)) from None
        for folder in folders:
            print(f"{folder.name:<24} key rewritten")
        print(f"Next: `moa index {args.out}` registers the keys. If they changed, a trained retriever head no longer "
              "fits them, so run `moa train-retriever` again or query with --untrained.")
        return
    results = train_library(base, encoder, segments, Path(args.out), Path(args.runs), training)
    for result in results:
        status = "skipped (already trained)" if result.skipped else "trained"
        print(f"{result.name:<24} {status:<26} validation NLL {result.validation_nll_before:.3f} -> "
              f"{result.validation_nll_after:.3f}")


def run_library_report(args: argparse.Namespace) -> None:
    import tempfile

    from .engine import MoA
    from .experts import load_splits
    from .specialisation import (library_checks_markdown, matrix_markdown, nll_matrix, open_library_store,
                                 routing_scores, sample_by_domain, save_heatmap, save_matrix)

    splits = load_splits(Path(args.corpus))
    validation = sample_by_domain(splits["validation"], args.per_domain)
    test = sample_by_domain(splits["test"], args.per_domain, seed=1)
    if args.domains:
        unknown = sorted(set(args.domains) - set(validation))
        if unknown:
            raise CommandError(f"--domains: {', '.join(unknown)} not in the corpus; it has {', '.join(validation)}.")
        validation = {domain: validation[domain] for domain in args.domains}
        test = {domain: test[domain] for domain in args.domains if domain in test}
    engine = MoA.from_config(_config(args))
    with tempfile.TemporaryDirectory() as scratch:
        store = open_library_store(engine, Path(args.library), Path(scratch) / "store") if args.library else engine.store
        records = store.adapters()
        matrix = nll_matrix(engine, list(records), validation, store)
        checks = matrix.specialisation_checks({adapter_id: record.domain for adapter_id, record in records.items()})
        routing = routing_scores(engine, store, test, use_trained=False)
    save_heatmap(matrix, Path(args.heatmap), f"{args.title}: NLL gain per adapter and domain")
    if args.matrix:
        save_matrix(matrix, Path(args.matrix))
    result = {"library": args.library or str(engine.config.adapters_dir), "matrix": matrix.__dict__, "checks": checks,
              "routing": routing.__dict__, "domains": {k: r.domain for k, r in records.items()},
              "descriptions": {k: r.description for k, r in records.items()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(matrix_markdown(matrix), "\n")
    print(library_checks_markdown(checks), "\n")
    print(json.dumps(routing.__dict__, indent=1))


def run_eval(args: argparse.Namespace) -> None:
    from .engine import MoA
    from .evaluation import CONFIGS, load_queries, markdown_table, run_eval as evaluate, sample_test_queries

    settings = RouteSettings(top_k=args.top_k, threshold=args.threshold, max_iterations=args.max_iterations,
                             max_new_tokens=args.max_new_tokens)
    queries = load_queries(Path(args.queries)) if args.queries else sample_test_queries(Path(args.corpus),
                                                                                       args.per_domain)
    engine = MoA.from_config(_config(args))
    result = evaluate(engine, queries, settings, args.configs or CONFIGS)
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
        return
    print(f"{len(queries)} queries, {engine.store.count()} adapters, top_k {args.top_k}\n")
    print(markdown_table(result["configs"]))


def run_bench(args: argparse.Namespace) -> None:
    from .benchmark import STAGES, machine_description, markdown, run_bench as bench
    from .engine import MoA

    config = _config(args)
    engine = MoA.from_config(config)
    result = bench(engine, config, args.repeats, tuple(args.chroma_sizes), args.tokens, tuple(args.stages or STAGES))
    command = "moa bench " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "moa bench"
    text = markdown(result, command, machine_description(), args.repeats)
    if args.out == "-":
        print(text)
        return
    section = "GPU" if engine.base.device.type == "cuda" else "CPU"
    write_section(Path(args.out), section, text)
    print(text)


def run_bench_scale(args: argparse.Namespace) -> None:
    import dataclasses

    from .benchmark import machine_description
    from .scale import ScaleSettings, bench_scale, markdown

    settings = ScaleSettings(adapters=args.adapters, rank=args.rank, retrieval_queries=args.retrieval_queries,
                             route_queries=args.route_queries, max_new_tokens=args.max_new_tokens)
    config = _config(args)
    if args.cache_size is not None:
        config = dataclasses.replace(config, adapter_cache_size=args.cache_size)
    result = bench_scale(config, settings, Path(args.scratch) if args.scratch else None)
    text = markdown(result, " ".join(["moa", "bench-scale", *sys.argv[2:]]), machine_description())
    if args.out != "-":
        write_section(Path(args.out), "Scale", text)
    print(text)


def write_section(path: Path, section: str, text: str) -> None:
    """Replace the `## {section}` section of a Markdown file, keeping every other section."""
    header = f"## {section}"
    existing = path.read_text() if path.is_file() else "# Benchmarks\n"
    parts = existing.split("\n## ")
    kept = [parts[0].rstrip()] + ["## " + part.rstrip() for part in parts[1:] if not part.startswith(section + "\n")]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(kept + [f"{header}\n\n{text}"]) + "\n")


def run_train_retriever(args: argparse.Namespace) -> None:
    import random

    from .corpus import Example
    from .engine import MoA
    from .evaluation import load_queries
    from .experts import load_splits
    from .retriever_training import (DEFAULT_HEAD_PATH, TrainingSettings, report_markdown, save_curves,
                                     train_retriever)
    from .specialisation import sample_by_domain

    if args.candidates < 8:
        raise CommandError(f"--candidates must be at least 8, got {args.candidates}.")
    engine = MoA.from_config(_config(args))
    splits = load_splits(Path(args.corpus))
    if args.queries:
        train = [Example(q.query, q.reference, (q.domains or [None])[0]) for q in load_queries(Path(args.queries))]
    else:
        train = [e for examples in sample_by_domain(splits["train"], args.per_domain).values() for e in examples]
    random.Random(0).shuffle(train)
    missing = [name for name in ("validation", "test") if name not in splits]
    if missing:
        raise CommandError(f"Corpus folder {args.corpus} has no {' or '.join(m + '.jsonl' for m in missing)}; "
                           "rebuild it with `moa build-corpus`.")
    validation = [e for examples in sample_by_domain(splits["validation"], args.validation_per_domain, seed=2).values()
                  for e in examples]
    test = [e for examples in sample_by_domain(splits["test"], args.test_per_domain, seed=1).values() for e in examples]
    routing_test = [e for examples in sample_by_domain(splits["test"], args.routing_per_domain, seed=3).values()
                    for e in examples]

    settings = TrainingSettings(epochs=args.epochs, learning_rate=args.learning_rate, rank=args.rank,
                                teacher_temperature=args.teacher_temperature)
    result = train_retriever(engine, train, validation, test, args.candidates, args.variants, settings,
                             args.retriever_temperature, cache=Path(args.cache) if args.cache else None,
                             routing_test=routing_test)
    out = Path(args.out) if args.out else DEFAULT_HEAD_PATH
    result.heads[result.chosen].save(out)
    save_curves(result.curves, Path(args.curves))
    report = result.to_json() | {"saved_to": str(out)}
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(json.dumps(report, indent=1) + "\n")
    print(report_markdown(report))
    print(f"saved the {result.chosen} head to {out}")


COMMANDS = {
    "train-retriever": run_train_retriever,
    "bench": run_bench,
    "bench-scale": run_bench_scale,
    "eval": run_eval,
    "library-report": run_library_report,
    "query": run_query,
    "index": run_index,
    "import": run_import,
    "list": run_list,
    "remove": run_remove,
    "build-corpus": run_build_corpus,
    "train-experts": run_train_experts,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not getattr(args, "verbose", False):
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    from .adapters import InvalidAdapterError
    from .engine import QueryError
    from .generation import PromptTooLongError
    from .indexing import IndexingError
    from .models import ModelLoadError
    from .store import StoreError

    user_errors = (CommandError, ConfigError, QueryError, PromptTooLongError, InvalidAdapterError, IndexingError,
                   StoreError, ModelLoadError, FileNotFoundError, KeyError, ValueError)
    try:
        COMMANDS[args.command](args)
    except user_errors as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
        message = " ".join(line.strip() for line in str(message).splitlines())
        print(f"moa {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
