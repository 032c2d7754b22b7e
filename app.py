"""Gradio app for Mixture of Adapters: ask a question, watch the adapters it retrieves, merges and refines.

Run `python app.py` (or `make app`) and open http://127.0.0.1:7860. The `/route` endpoint serves
gradio_client users with the same inputs and outputs as the Query tab.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the app contacts no host but its own

import functools
import logging
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from moa import MoA, MoAConfig, QueryError, RouteSettings, Trace
from moa.app_views import (
    ADAPTER_COLUMNS, EXAMPLES_BY_DOMAIN, EXAMPLES_TRANSLATION, EXAMPLES_TWO_DOMAINS, LIBRARY_COLUMN_WIDTHS, LIBRARY_COLUMNS,
    TOKEN_COLUMNS,
    MatrixFileError, about_markdown, adapter_table, attribution_figure, contribution_heatmap, control_help,
    empty_figure, error_figure, highest_error_position, key_map_figure, library_table, load_library_matrix, loop_diagram_svg,
    matrix_figure, retriever_comparison, status_markdown, timeline_html, token_choices, token_error_table,
    token_heatmap_html, weight_figure,
)
from moa.config import ERROR_METRICS, ConfigError
from moa.engine import clean_query
from moa.merging import MERGE_METHODS
from moa.refinement import STRATEGIES
from moa.store import StoreError

logger = logging.getLogger("moa.app")

MATRIX_PATH = Path(__file__).resolve().parent / "docs" / "library_matrix.json"
COMPARISON_DEPTH = 5
"""How many ranks the trained-versus-plain retriever comparison lists."""
MATRIX_NOTE_HEIGHT = 160
"""Pixel height of the figure shown in place of a missing or invalid matrix file."""
MAX_TOP_K = 16
MAX_ITERATIONS = 10
DEFAULTS = RouteSettings()
HELP = control_help(DEFAULTS)
STRATEGY_HELP = {name: (strategy.__doc__ or "").strip().splitlines()[0] for name, strategy in STRATEGIES.items()}

# The order of the route handler's outputs. The ones that are not gr.State are what `/route` returns.
ROUTE_OUTPUTS = ("answer", "adapters", "weights", "heatmap", "errors", "token_errors", "timeline", "base_answer",
                 "status", "trace", "stop_event")


@functools.cache
def get_engine() -> MoA:
    """Load the base model, the encoder and the adapter store once per process."""
    logger.info("Loading the MoA engine")
    engine = MoA.from_config(MoAConfig.load())
    logger.info("Engine ready: %d adapter(s) registered", engine.store.count())
    return engine


# ---- input checks ----------------------------------------------------------------------------


def _whole_number(name: str, value: float) -> int:
    if value is None or float(value) != int(value):
        raise gr.Error(f"{name} must be a whole number, got {value!r}.")
    return int(value)


def build_settings(top_k: float, temperature: float, merge_method: str, error_metric: str, threshold: float,
                   max_iterations: float, strategy: str, max_new_tokens: float, do_sample: bool,
                   use_trained_retriever: bool = True) -> RouteSettings:
    """Turn the control values into `RouteSettings`. An invalid value raises `gr.Error` that names it."""
    if merge_method not in MERGE_METHODS:
        raise gr.Error(f"Unknown merge method {merge_method!r}; choose one of {', '.join(MERGE_METHODS)}.")
    if strategy not in STRATEGIES:
        raise gr.Error(f"Unknown refinement strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}.")
    try:
        return RouteSettings(
            top_k=_whole_number("top_k", top_k), temperature=float(temperature), merge_method=merge_method,
            error_metric=error_metric, threshold=float(threshold),
            max_iterations=_whole_number("max_iterations", max_iterations), strategy=strategy,
            max_new_tokens=_whole_number("max_new_tokens", max_new_tokens), do_sample=bool(do_sample),
            use_trained_retriever=bool(use_trained_retriever),
        )
    except ConfigError as error:
        raise gr.Error(str(error)) from error


def check_texts(engine: MoA, query: str, reference: str | None) -> tuple[str, str | None]:
    """Return the cleaned query and reference. An empty or over-long query or reference raises `gr.Error`."""
    try:
        query = clean_query(query, engine.config.max_query_chars)
    except QueryError as error:
        raise gr.Error(str(error)) from error
    reference = (reference or "").strip() or None
    if reference is not None and len(reference) > engine.config.max_query_chars:
        raise gr.Error(f"The reference answer is {len(reference)} characters long; the limit is "
                       f"{engine.config.max_query_chars}. Shorten it.")
    return query, reference


def as_gradio_error(error: Exception) -> gr.Error:
    """Convert an exception from the engine into `gr.Error`, logging unexpected ones with their traceback."""
    if isinstance(error, (ValueError, StoreError)):  # QueryError, ConfigError, PromptTooLongError, MergeError
        logger.info("Rejected a request: %s", error)
        return gr.Error(str(error))
    logger.error("Routing failed", exc_info=error)
    return gr.Error(f"Routing failed with {type(error).__name__}: {error}. The server log has the traceback.")


# ---- the query view --------------------------------------------------------------------------


def _outputs(**values: Any) -> tuple[Any, ...]:
    """Order values by `ROUTE_OUTPUTS`, leaving the ones not given unchanged on the page."""
    unknown = set(values) - set(ROUTE_OUTPUTS)
    if unknown:
        raise KeyError(f"Not a route output: {', '.join(sorted(unknown))}.")
    return tuple(values.get(name, gr.skip()) for name in ROUTE_OUTPUTS)


def _route_in_thread(engine: MoA, query: str, settings: RouteSettings, reference: str | None,
                     stop: threading.Event, events: queue.Queue) -> None:
    """Route the query, then answer with the base model, posting tokens and results to `events`.

    The handler thread reads `events`; this thread always posts ("end", None) last.
    """
    try:
        trace = engine.route(query, settings, reference, on_token=lambda piece: events.put(("token", piece)),
                             on_iteration=lambda iteration: events.put(("iteration", iteration)), stop_event=stop)
        events.put(("trace", trace))
        if not trace.best.adapters:
            # no adapter was merged, so the chosen answer already is the base model's, with the same decoding
            events.put(("base", trace.final_answer))
        elif not stop.is_set():
            base = engine.generate_base(query, settings, on_token=lambda piece: events.put(("base_token", piece)),
                                        stop_event=stop)
            events.put(("base", base.text))
    except Exception as error:  # the handler re-raises it as gr.Error in the request's own thread
        events.put(("error", error))
    finally:
        events.put(("end", None))


def _trace_views(trace: Trace, library_size: int) -> dict[str, Any]:
    best = trace.best
    return {
        "answer": trace.final_answer, "adapters": adapter_table(best), "weights": weight_figure(best, library_size),
        "heatmap": token_heatmap_html(best), "errors": error_figure(best), "token_errors": token_error_table(best),
        "timeline": timeline_html(trace.iterations, trace.final_iteration, trace.stopped_because),
    }


def route(query: str, reference: str, top_k: float, temperature: float, merge_method: str, error_metric: str,
          threshold: float, max_iterations: float, strategy: str, max_new_tokens: float,
          do_sample: bool, use_trained_retriever: bool = True) -> Iterator[tuple[Any, ...]]:
    """Answer `query` through the MoA loop, streaming the merged answer and then the base model's.

    Returns the answer, the adapter table, the weight chart, the token heatmap, the error chart,
    the per-token errors, the iteration timeline, the base model's answer and a status line.
    """
    engine = get_engine()
    query, reference = check_texts(engine, query, reference)
    settings = build_settings(top_k, temperature, merge_method, error_metric, threshold, max_iterations, strategy,
                              max_new_tokens, do_sample, use_trained_retriever)
    library_size = engine.store.count()
    stop = threading.Event()
    events: queue.Queue = queue.Queue()
    worker = threading.Thread(target=_route_in_thread, args=(engine, query, settings, reference, stop, events),
                              name="moa-route", daemon=True)
    started = time.perf_counter()
    iterations, streamed, base_streamed, base_text, trace = [], "", "", "", None

    def progress_line(action: str) -> str:
        return (f"Iteration {len(iterations) + 1} of at most {settings.max_iterations}: {action} "
                f"({time.perf_counter() - started:.0f} s)")

    worker.start()
    try:
        yield _outputs(answer="", adapters=adapter_table(None), weights=weight_figure(None, library_size),
                       heatmap=token_heatmap_html(None), errors=error_figure(None), token_errors=token_error_table(None),
                       timeline=timeline_html([]), base_answer="", status=progress_line("retrieving and merging"),
                       stop_event=stop)
        while True:
            kind, payload = events.get()
            if kind == "end":
                break
            if kind == "error":
                raise as_gradio_error(payload) from payload
            if kind == "token":
                streamed += payload
                yield _outputs(answer=streamed, status=progress_line(f"generating, {len(streamed)} characters"))
            elif kind == "iteration":
                iterations.append(payload)
                streamed = ""
                action = "refining" if payload.decision == "refine" else "finishing"
                yield _outputs(timeline=timeline_html(iterations), status=progress_line(action))
            elif kind == "trace":
                trace = payload
                yield _outputs(**_trace_views(trace, library_size), status="Generating the base model's answer…")
            elif kind == "base_token":
                base_streamed += payload
                yield _outputs(base_answer=base_streamed)
            elif kind == "base":
                base_text = payload
        if trace is None:
            raise gr.Error("The request ended without a result; the server log has the details.")
        status = status_markdown(trace, time.perf_counter() - started, library_size)
        yield _outputs(**_trace_views(trace, library_size), base_answer=base_text, status=status, trace=trace)
    finally:
        stop.set()  # closing the generator (Stop, a cancelled client, a closed page) frees the model


def stop_route(stop_event: threading.Event | None) -> None:
    """Ask the running request to stop after its current token, so its handler shows the partial result."""
    if stop_event is not None:
        stop_event.set()


def describe_merge_method(name: str) -> dict[str, Any]:
    return gr.update(info=f"{name}: {MERGE_METHODS.get(name, '')}")


def describe_strategy(name: str) -> dict[str, Any]:
    return gr.update(info=f"{name}: {STRATEGY_HELP.get(name, '')}")


# ---- the attribution view --------------------------------------------------------------------


def show_attribution_choices(trace: Trace | None) -> tuple[Any, ...]:
    """List the final iteration's scored tokens and show the one with the highest error."""
    iteration = trace.best if trace is not None else None
    position = highest_error_position(iteration) if iteration is not None else None
    if iteration is None:
        note = "Run a query on the Query tab first."
    elif not iteration.adapters:
        note = "The final iteration used no adapter, so no error can be attributed to one."
    else:
        note = (f"Final iteration {iteration.index + 1}: {len(iteration.tokens)} scored tokens "
                f"({iteration.error_metric}). The token with the highest error is selected.")
    return (gr.update(choices=token_choices(iteration), value=position), note,
            attribution_figure(iteration, position), contribution_heatmap(iteration))


def show_attribution(trace: Trace | None, position: int | None) -> Any:
    return attribution_figure(trace.best if trace is not None else None, position)


# ---- the library view ------------------------------------------------------------------------


def library_banner() -> str:
    store = get_engine().store
    count = store.count()
    if count == 0:
        return ("**The adapter library is empty**, so every query is answered by the base model alone. "
                "Index a folder of adapters with `moa index FOLDER` and reload the page.")
    return f"{count} adapter{'s' if count != 1 else ''} for `{store.model_id}` in the library."


def show_library(trace: Trace | None) -> tuple[Any, ...]:
    """Return the library banner, the adapter table, the key map with the last query and the retriever comparison."""
    engine = get_engine()
    records = engine.store.adapters()
    key_ids, keys = engine.store.keys()
    comparison = retriever_comparison([], None)
    if trace is None or not records:
        key_map = key_map_figure(key_ids, keys, records)
        note = "Run a query to place it on the map and compare the retrievers' rankings."
    else:
        use_trained = bool(trace.settings.get("use_trained_retriever", True))
        embedding = engine.embed_query(trace.query, use_trained=use_trained)
        key_map = key_map_figure(key_ids, keys, records, trace.query, embedding, [use.id for use in trace.best.adapters])
        depth = min(COMPARISON_DEPTH, len(records))
        plain = engine.retrieve(trace.query, depth, use_trained=False)
        trained = engine.retrieve(trace.query, depth, use_trained=True) if engine.query_head is not None else None
        comparison = retriever_comparison(plain, trained)
        note = f"Rankings for the last query, {trace.query!r}."
        if trained is None:
            note += " No trained retriever head is loaded, so only the plain encoder's ranking is shown."
    return library_banner(), library_table(records), key_map, comparison, note


def show_matrix(view: str) -> Any:
    """Return the adapter × domain heatmap, or a figure saying why there is none."""
    try:
        matrix = load_library_matrix(MATRIX_PATH)
    except MatrixFileError as error:
        logger.warning("Cannot show the library matrix: %s", error)
        return empty_figure(str(error), height=MATRIX_NOTE_HEIGHT)
    if matrix is None:
        return empty_figure("The adapter × domain matrix is not built yet "
                            f"({MATRIX_PATH.relative_to(MATRIX_PATH.parents[1])} does not exist).",
                            height=MATRIX_NOTE_HEIGHT)
    return matrix_figure(matrix, relative=view == "minus base")


# ---- layout ----------------------------------------------------------------------------------


def build_demo() -> gr.Blocks:
    """Lay out the Query, Attribution, Library and About tabs and wire their events."""
    engine = get_engine()
    with gr.Blocks(title="Mixture of Adapters") as demo:
        gr.Markdown("# Mixture of Adapters\nEach query retrieves LoRA adapters from a library, merges them by "
                    "relevance, answers, measures the error of every token and refines the retrieval while the "
                    "error is above a threshold.")
        banner = gr.Markdown()
        trace_state = gr.State(None)
        stop_state = gr.State(None)

        with gr.Tabs():
            with gr.Tab("Query"):
                with gr.Row():
                    with gr.Column(scale=3):
                        query = gr.Textbox(label="Query", lines=2, max_lines=8, elem_id="query",
                                           placeholder="Ask a question, or pick an example below.")
                        reference = gr.Textbox(label="Reference answer", lines=1, max_lines=6,
                                               info=HELP["Reference answer"], elem_id="reference")
                        with gr.Row():
                            run_button = gr.Button("Run", variant="primary", elem_id="run")
                            stop_button = gr.Button("Stop", variant="stop", elem_id="stop")
                        gr.Examples(EXAMPLES_BY_DOMAIN, inputs=query, label="One per domain", examples_per_page=15)
                        gr.Examples(EXAMPLES_TWO_DOMAINS, inputs=query, label="Spanning two domains")
                        gr.Examples(EXAMPLES_TRANSLATION, inputs=query, label="Translation")
                    with gr.Column(scale=2):
                        with gr.Accordion("Settings", open=True):
                            top_k = gr.Slider(1, MAX_TOP_K, value=DEFAULTS.top_k, step=1, precision=0,
                                              label="Top-k", info=HELP["Top-k"])
                            temperature = gr.Slider(0.01, 2.0, value=DEFAULTS.temperature, step=0.01,
                                                    label="Temperature", info=HELP["Temperature"])
                            merge_method = gr.Dropdown(list(MERGE_METHODS), value=DEFAULTS.merge_method,
                                                       label="Merge method",
                                                       info=f"{DEFAULTS.merge_method}: "
                                                            f"{MERGE_METHODS[DEFAULTS.merge_method]}")
                            error_metric = gr.Dropdown(["auto", *ERROR_METRICS], value=DEFAULTS.error_metric,
                                                       label="Error metric", info=HELP["Error metric"])
                            threshold = gr.Slider(0.0, 10.0, value=DEFAULTS.threshold, step=0.05,
                                                  label="Threshold (nats)", info=HELP["Threshold"])
                            max_iterations = gr.Slider(1, MAX_ITERATIONS, value=DEFAULTS.max_iterations, step=1,
                                                       precision=0, label="Maximum iterations",
                                                       info=HELP["Maximum iterations"])
                            strategy = gr.Dropdown(list(STRATEGIES), value=DEFAULTS.strategy,
                                                   label="Refinement strategy",
                                                   info=f"{DEFAULTS.strategy}: {STRATEGY_HELP[DEFAULTS.strategy]}")
                            max_new_tokens = gr.Slider(1, engine.config.max_new_tokens_limit,
                                                       value=DEFAULTS.max_new_tokens, step=1, precision=0,
                                                       label="Maximum new tokens", info=HELP["Maximum new tokens"],
                                                       elem_id="max-new-tokens")
                            do_sample = gr.Checkbox(value=DEFAULTS.do_sample, label="Sampling",
                                                    info=HELP["Sampling"])
                            trained_retriever = gr.Checkbox(
                                value=engine.query_head is not None, interactive=engine.query_head is not None,
                                label="Trained retriever head", elem_id="trained-retriever",
                                info="Route with the query head trained from the LM's scores; off uses the plain "
                                     "encoder." if engine.query_head is not None else
                                     "No trained query head is loaded, so the plain encoder routes.")

                status = gr.Markdown("Pick an example or type a query, then press Run.", elem_id="status")
                with gr.Row(equal_height=True):
                    answer = gr.Textbox(label="Merged answer", lines=4, interactive=False, elem_id="answer")
                    base_answer = gr.Textbox(label="Base model alone", lines=4, interactive=False,
                                             elem_id="base-answer")
                gr.Markdown("### Answer coloured by per-token error")
                heatmap = gr.HTML(token_heatmap_html(None), elem_id="token-heatmap")
                with gr.Row():
                    error_plot = gr.Plot(error_figure(None), label="Error per token", elem_id="error-plot")
                    weight_plot = gr.Plot(weight_figure(None, 0), label="Relevance weights", elem_id="weight-plot")
                adapter_frame = gr.Dataframe(adapter_table(None), headers=ADAPTER_COLUMNS, interactive=False, wrap=True,
                                             label="Retrieved adapters (final iteration)", elem_id="adapter-table")
                gr.Markdown("### Refinement iterations")
                timeline = gr.HTML(timeline_html([]), elem_id="timeline")
                with gr.Accordion("Per-token errors", open=False):
                    token_frame = gr.Dataframe(token_error_table(None), headers=TOKEN_COLUMNS, interactive=False,
                                               label="Scored tokens of the final iteration", elem_id="token-table")

            with gr.Tab("Attribution"):
                gr.Markdown("How much did each adapter change the error of one token? Each bar is the token's "
                            "error without that adapter minus its error with all of them: a positive bar means "
                            "the adapter lowered the error.")
                attribution_note = gr.Markdown("Run a query on the Query tab first.")
                token_picker = gr.Dropdown([], value=None, label="Scored token", elem_id="token-picker",
                                           info="The tokens of the final iteration, with their error in nats.")
                attribution_plot = gr.Plot(attribution_figure(None, None), label="Change in error per adapter")
                contribution_plot = gr.Plot(contribution_heatmap(None), label="Adapters × tokens")

            with gr.Tab("Library"):
                library_frame = gr.Dataframe(library_table({}), headers=LIBRARY_COLUMNS, interactive=False, wrap=True,
                                             column_widths=LIBRARY_COLUMN_WIDTHS, label="Registered adapters",
                                             elem_id="library-table")
                refresh_button = gr.Button("Refresh", size="sm")
                key_map = gr.Plot(label="Adapter keys and the last query", elem_id="key-map")
                comparison_note = gr.Markdown()
                comparison_frame = gr.Dataframe(retriever_comparison([], None), interactive=False,
                                                label="Retrieval ranking: plain encoder and trained query head")
                matrix_view = gr.Radio(["minus base", "absolute"], value="minus base", label="Matrix values",
                                       info="NLL minus the base model's NLL on the same domain, or the NLL itself.")
                matrix_plot = gr.Plot(label="Adapter × domain specialisation", elem_id="library-matrix")

            with gr.Tab("About"):
                gr.Markdown("## The loop")
                gr.HTML(loop_diagram_svg(), elem_id="about-diagram")
                gr.Markdown(about_markdown(HELP, MERGE_METHODS, STRATEGY_HELP), elem_id="about")

        # the main event, also served to gradio_client users as /route
        controls = [query, reference, top_k, temperature, merge_method, error_metric, threshold, max_iterations,
                    strategy, max_new_tokens, do_sample, trained_retriever]
        outputs = [answer, adapter_frame, weight_plot, heatmap, error_plot, token_frame, timeline, base_answer, status,
                   trace_state, stop_state]
        route_event = run_button.click(route, controls, outputs, api_name="route", show_progress="minimal")
        submit_event = query.submit(route, controls, outputs, api_visibility="private", show_progress="minimal")
        # Stop sets the running request's stop event, so the route handler finishes after the current
        # token and shows what it has. NOTE: gradio 6.31's `cancels=` is not used here, because a Run
        # pressed right after a cancel was sometimes ignored by the page until it was reloaded.
        stop_button.click(stop_route, stop_state, None, api_visibility="private", concurrency_limit=None)

        library_outputs = [banner, library_frame, key_map, comparison_frame, comparison_note]
        for event in (route_event, submit_event):
            event.success(show_attribution_choices, trace_state,
                          [token_picker, attribution_note, attribution_plot, contribution_plot],
                          api_visibility="private")
            event.success(show_library, trace_state, library_outputs, api_visibility="private")
        token_picker.input(show_attribution, [trace_state, token_picker], attribution_plot, api_visibility="private")
        merge_method.input(describe_merge_method, merge_method, merge_method, api_visibility="private", queue=False)
        strategy.input(describe_strategy, strategy, strategy, api_visibility="private", queue=False)

        refresh_button.click(show_library, trace_state, library_outputs, api_visibility="private").then(
            show_matrix, matrix_view, matrix_plot, api_visibility="private")
        matrix_view.change(show_matrix, matrix_view, matrix_plot, api_visibility="private")
        demo.load(show_library, trace_state, library_outputs, api_visibility="private")
        demo.load(show_matrix, matrix_view, matrix_plot, api_visibility="private")
    return demo


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    get_engine()  # load the models before the server accepts requests
    demo = build_demo()
    demo.queue(default_concurrency_limit=1)
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # system fonts, so no font is downloaded
    demo.launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                server_port=int(os.environ.get("GRADIO_SERVER_PORT", 7860)), theme=theme)


if __name__ == "__main__":
    main()
