"""The Gradio app: its view builders on hand-made traces, and the running server through gradio_client."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from moa.app_views import (
    ADAPTER_COLUMNS, TOKEN_COLUMNS, MatrixFileError, adapter_table, attribution_figure, error_colour, error_figure,
    key_map_figure, load_library_matrix, matrix_figure, project_2d, timeline_html, token_error_table,
    token_heatmap_html, weight_figure,
)
from moa.trace import AdapterUse, Iteration, TokenError, Trace

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_MODEL_CACHE = Path(os.environ.get("MOA_TEST_MODEL_CACHE", Path.home() / ".cache" / "moa" / "models"))
STARTUP_TIMEOUT_SECONDS = 300
"""Loading SmolLM2 takes seconds, but the first run also dequantizes it and indexes adapters/."""
MAX_NEW_TOKENS = 12
QUERY = "What is the chemistry of baking soda in a cake?"
OTHER_QUERY = "Translate 'tree' into German."


# ---- view builders, on a hand-made trace (no model) ------------------------------------------


def make_iteration(index: int = 0, decision: str = "accept", with_adapters: bool = True) -> Iteration:
    tokens = [TokenError("Baking", 1.5, 1), TokenError(" soda", 3.0, 2), TokenError("\n", 0.2, 3),
              TokenError("<|im_end|>", 0.1, 4)]
    adapters = []
    if with_adapters:
        adapters = [
            AdapterUse("chemistry", "Chemistry", "chemistry", 0.61, 0.7, 0.4, 1.2, [0.5, 0.9, -0.1, 0.0]),
            AdapterUse("food", "Food & cooking", "food", 0.55, 0.3, -0.1, 1.6, [-0.2, 0.1, 0.0, 0.0]),
        ]
    return Iteration(index=index, retrieval_query="baking soda", adapters=adapters, merge_method="exact",
                     execution_path="unmerged", error_metric="surprisal", answer="Baking soda\n", tokens=tokens,
                     answer_tokens=tokens, mean_error=1.2, threshold=2.0, decision=decision,
                     reason="mean error 1.200 vs threshold 2.000: below, accepted")


def test_adapter_table_lists_each_adapter():
    table = adapter_table(make_iteration())
    assert list(table.columns) == ADAPTER_COLUMNS
    assert table["rank"].tolist() == [1, 2]
    assert table["adapter"].tolist() == ["Chemistry", "Food & cooking"]
    assert table["error contribution"].tolist() == [0.4, -0.1]


def test_adapter_table_empty_iteration():
    assert adapter_table(make_iteration(with_adapters=False)).empty
    assert adapter_table(None).empty


def test_weight_figure_without_adapters_says_why():
    figure = weight_figure(make_iteration(with_adapters=False), library_size=0)
    assert not figure.data
    assert "library is empty" in figure.layout.annotations[0].text


def test_weight_figure_has_one_bar_per_adapter():
    figure = weight_figure(make_iteration(), library_size=2)
    assert sorted(figure.data[0].x) == [0.3, 0.7]


def test_error_figure_draws_threshold_line():
    figure = error_figure(make_iteration())
    assert list(figure.data[0].y) == [1.5, 3.0, 0.2, 0.1]
    assert figure.layout.shapes[0].y0 == 2.0
    assert figure.layout.shapes[1].y0 == 1.2


def test_heatmap_escapes_and_colours_tokens():
    page = token_heatmap_html(make_iteration())
    assert page.count('class="moa-token"') == 4
    assert "&lt;|im_end|&gt;" in page
    assert "<|im_end|>" not in page


@pytest.mark.parametrize("error, expected_background, expected_text", [
    (0.0, "#ffffcc", "#1a1a1a"),
    (2.0, "#fd8d3c", "#1a1a1a"),
    (4.0, "#bd0026", "#ffffff"),
    (9.0, "#bd0026", "#ffffff"),
    (-1.0, "#ffffcc", "#1a1a1a"),
])
def test_error_colour_scale(error, expected_background, expected_text):
    assert error_colour(error, scale_max=4.0) == (expected_background, expected_text)


def test_token_error_table_keeps_raw_text():
    table = token_error_table(make_iteration())
    assert list(table.columns) == TOKEN_COLUMNS
    assert table["token"].tolist() == ["Baking", " soda", "\n", "<|im_end|>"]


def test_timeline_marks_chosen_iteration():
    iterations = [make_iteration(0, "refine"), make_iteration(1, "accept")]
    page = timeline_html(iterations, final_iteration=1, stopped_because="below_threshold")
    assert page.count('class="moa-iteration"') == 2
    assert page.count("chosen answer") == 1
    assert page.index("chosen answer") > page.index("Iteration 2")
    assert "fell below the threshold" in page


def test_attribution_figure_uses_token_contributions():
    figure = attribution_figure(make_iteration(), position=1)
    assert list(figure.data[0].x) == [0.9, 0.1]
    assert list(figure.data[0].y) == ["Chemistry", "Food & cooking"]


def test_attribution_figure_without_adapters():
    figure = attribution_figure(make_iteration(with_adapters=False), position=0)
    assert not figure.data


def test_project_2d_matches_svd_of_centred_keys():
    torch.manual_seed(0)
    keys = torch.randn(6, 8)
    coordinates, query_point, explained = project_2d(keys, keys[2])
    centred = keys - keys.mean(dim=0)
    _, singular_values, _ = torch.linalg.svd(centred)
    # the projection keeps the variance of the two largest components
    torch.testing.assert_close(coordinates.pow(2).sum(dim=0), singular_values[:2].pow(2), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(query_point, coordinates[2])
    assert explained[0] >= explained[1] > 0


def test_project_2d_single_key():
    coordinates, _, explained = project_2d(torch.ones(1, 4))
    assert coordinates.tolist() == [[0.0, 0.0]]
    assert explained == [0.0, 0.0]


def test_key_map_empty_store_says_so():
    figure = key_map_figure([], torch.empty(0), {})
    assert "library is empty" in figure.layout.annotations[0].text


def test_library_matrix_missing_file(tmp_path):
    assert load_library_matrix(tmp_path / "library_matrix.json") is None


def test_library_matrix_rejects_wrong_shape(tmp_path):
    path = tmp_path / "library_matrix.json"
    path.write_text(json.dumps({"adapters": ["a", "b"], "domains": ["x"], "nll": [[1.0]]}))
    with pytest.raises(MatrixFileError, match="expected nll of shape"):
        load_library_matrix(path)


def test_matrix_figure_relative_to_base(tmp_path):
    path = tmp_path / "library_matrix.json"
    path.write_text(json.dumps({"adapters": ["a", "b"], "domains": ["x", "y"], "nll": [[1.0, 3.0], [2.0, 2.5]],
                                "base": [2.0, 3.0]}))
    figure = matrix_figure(load_library_matrix(path), relative=True)
    assert [list(row) for row in figure.data[0].z] == [[-1.0, 0.0], [0.0, -0.5]]


def test_trace_best_is_final_iteration():
    trace = Trace("q", None, "Baking soda", 1, "below_threshold", [make_iteration(0, "refine"), make_iteration(1)], {})
    assert trace.best.index == 1


# ---- the running app, through gradio_client --------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def app_environment(home: Path, port: int) -> dict[str, str]:
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("MOA_STORE", "MOA_CHROMA_URL", "MOA_CONFIG")}
    environment.update({
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
        "ANONYMIZED_TELEMETRY": "False", "TOKENIZERS_PARALLELISM": "false",
        "MOA_HOME": str(home), "MOA_MODEL_CACHE": str(SHARED_MODEL_CACHE), "MOA_ADAPTERS": str(REPO_ROOT / "adapters"),
        "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
    })
    return environment


def wait_until_serving(url: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"app.py exited with code {process.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1.0)
    pytest.fail(f"app.py did not answer at {url} within {STARTUP_TIMEOUT_SECONDS} s:\n{log_path.read_text()[-4000:]}")


def start_app(request: pytest.FixtureRequest, workdir: Path) -> str:
    """Start app.py on a free loopback port, stop it when the requesting scope ends, and return its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    log_path = workdir / "app.log"
    log = open(log_path, "w")
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / "app.py")], cwd=REPO_ROOT,
                               env=app_environment(workdir / "home", port), stdout=log, stderr=subprocess.STDOUT)

    def stop() -> None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()

    request.addfinalizer(stop)
    wait_until_serving(url, process, log_path)
    return url


@pytest.fixture(scope="module")
def app_workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("app")


@pytest.fixture(scope="module")
def app_url(request, app_workdir) -> str:
    return start_app(request, app_workdir)


def route(url: str, query: str, max_new_tokens: int = MAX_NEW_TOKENS, reference: str = "",
          use_trained_retriever: bool | None = None) -> dict:
    """Call /route from a new client session and name its outputs.

    Without `use_trained_retriever` the call leaves that last input out, as older clients do.
    """
    from gradio_client import Client

    client = Client(url, verbose=False)
    inputs = [query, reference, 3, 0.1, "exact", "auto", 2.0, 2, "chain", max_new_tokens, False]
    if use_trained_retriever is not None:
        inputs.append(use_trained_retriever)
    result = client.predict(*inputs, api_name="/route")
    names = ("answer", "adapters", "weights", "heatmap", "errors", "token_errors", "timeline", "base_answer", "status")
    return dict(zip(names, result, strict=True))


@pytest.fixture(scope="module")
def alone_results(app_url) -> dict[str, dict]:
    return {query: route(app_url, query) for query in (QUERY, OTHER_QUERY)}


@pytest.mark.slow
def test_route_returns_answer_and_views(alone_results):
    result = alone_results[QUERY]
    assert result["answer"].strip()
    assert result["base_answer"].strip()
    assert result["status"].startswith("Answered")

    assert result["adapters"]["headers"] == ADAPTER_COLUMNS
    rows = result["adapters"]["data"]
    assert len(rows) <= 3 + 4  # top_k plus the widening of up to two refinements
    if rows:
        weights = [row[ADAPTER_COLUMNS.index("weight")] for row in rows]
        assert sum(weights) == pytest.approx(1.0, abs=1e-3)
    else:
        assert "base model answered alone" in result["status"]

    assert result["token_errors"]["headers"] == TOKEN_COLUMNS
    errors = [row[2] for row in result["token_errors"]["data"]]
    assert 1 <= len(errors) <= MAX_NEW_TOKENS
    assert all(math.isfinite(error) and error >= 0 for error in errors)
    assert result["heatmap"].count('class="moa-token"') == len(errors)
    assert "Iteration 1" in result["timeline"]


@pytest.mark.slow
def test_route_switches_retriever(app_url, alone_results):
    if not (REPO_ROOT / "retriever" / "query_head.safetensors").is_file():
        pytest.skip("no trained retriever head in retriever/")
    similarity = ADAPTER_COLUMNS.index("similarity")
    trained = route(app_url, QUERY, use_trained_retriever=True)
    plain = route(app_url, QUERY, use_trained_retriever=False)
    # the head moves the query embedding, so the first adapter's similarity changes with the switch
    assert trained["adapters"]["data"][0][similarity] != plain["adapters"]["data"][0][similarity]
    assert trained["adapters"]["data"] == alone_results[QUERY]["adapters"]["data"]  # on by default


@pytest.mark.slow
def test_route_charts_are_plotly(alone_results):
    result = alone_results[QUERY]
    error_chart = json.loads(result["errors"]["plot"])
    assert result["errors"]["type"] == "plotly"
    assert error_chart["layout"]["shapes"][0]["y0"] == 2.0  # the threshold line
    assert len(error_chart["data"][0]["y"]) == len(result["token_errors"]["data"])
    assert result["weights"]["type"] == "plotly"
    json.loads(result["weights"]["plot"])


@pytest.mark.slow
@pytest.mark.parametrize("query, message", [
    ("   ", "empty"),
    ("x" * 5000, "characters long; the limit is"),
    ("word " * 700, "tokens after the chat template"),  # under the character limit, over max_prompt_tokens
])
def test_route_rejects_bad_query(app_url, query, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=message):
        route(app_url, query)


@pytest.mark.slow
def test_concurrent_clients_match_alone(app_url, alone_results):
    together: dict[str, dict] = {}

    def run(query: str) -> None:
        together[query] = route(app_url, query)

    threads = [threading.Thread(target=run, args=(query,)) for query in alone_results]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)

    assert set(together) == set(alone_results)
    for query, alone in alone_results.items():
        assert together[query]["answer"] == alone["answer"], query
        assert together[query]["base_answer"] == alone["base_answer"], query
        assert together[query]["adapters"]["data"] == alone["adapters"]["data"], query
        assert together[query]["token_errors"]["data"] == alone["token_errors"]["data"], query


def cli_query(workdir: Path, query: str) -> dict:
    """Send `route`'s request through `moa query --json` in its own process, on the app's store; drop timings."""
    command = [sys.executable, "-m", "moa.cli", "query", query, "--json", "--top-k", "3", "--temperature", "0.1",
               "--merge", "exact", "--metric", "auto", "--threshold", "2.0", "--max-iterations", "2",
               "--strategy", "chain", "--max-new-tokens", str(MAX_NEW_TOKENS)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=app_environment(workdir / "home", free_port()),
                            capture_output=True, text=True, timeout=STARTUP_TIMEOUT_SECONDS)
    assert result.returncode == 0, result.stderr[-3000:]
    trace = json.loads(result.stdout)
    for iteration in trace["iterations"]:
        del iteration["seconds"]
    return trace


@pytest.mark.slow
def test_clients_and_cli_match_alone(app_url, app_workdir, alone_results):
    """Two app users and a command-line query on the app's store at once: each gets its result from alone."""
    cli_alone = cli_query(app_workdir, OTHER_QUERY)
    together: dict[str, dict] = {}

    def run_app(query: str) -> None:
        together[query] = route(app_url, query)

    def run_cli() -> None:
        together["cli"] = cli_query(app_workdir, OTHER_QUERY)

    threads = [threading.Thread(target=run_app, args=(query,)) for query in alone_results]
    threads.append(threading.Thread(target=run_cli))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)

    assert together["cli"] == cli_alone
    for query, alone in alone_results.items():
        assert together[query]["answer"] == alone["answer"], query
        assert together[query]["base_answer"] == alone["base_answer"], query
        assert together[query]["adapters"]["data"] == alone["adapters"]["data"], query
        assert together[query]["token_errors"]["data"] == alone["token_errors"]["data"], query
    # The app's base model still generates the answer it gave alone. Bit-identical weights after concurrent merged
    # requests are checked directly on the tiny model in test_reliability.py.
    assert route(app_url, QUERY)["base_answer"] == alone_results[QUERY]["base_answer"]


@pytest.mark.slow
def test_cancelled_request_frees_model(app_url, alone_results):
    from gradio_client import Client

    started = time.monotonic()
    route(app_url, OTHER_QUERY)
    alone_seconds = time.monotonic() - started

    client = Client(app_url, verbose=False)
    job = client.submit("Count from 1 to 500, separated by commas.", "", 3, 0.1, "exact", "auto", 0.0, 1, "chain",
                        400, False, api_name="/route")
    wait_for_outputs(job, 10)  # the long request is generating
    assert not job.done(), "the long request ended before it could be cancelled"
    job.cancel()

    started = time.monotonic()
    result = route(app_url, OTHER_QUERY)
    waited = time.monotonic() - started
    assert result["answer"] == alone_results[OTHER_QUERY]["answer"]
    # A cancelled request that kept the model would make this one wait for the rest of its 400
    # tokens. Without the stop event that took over 30 s (SmolLM2 on two busy CPU cores), while a
    # stopped request costs at most one more token and its scoring.
    assert waited < 2 * alone_seconds + 10, f"waited {waited:.1f} s; alone the request took {alone_seconds:.1f} s"


def wait_for_outputs(job, count: int, timeout: float = 120.0) -> None:
    """Wait until a streaming job has yielded `count` outputs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(job.outputs()) >= count:
            return
        time.sleep(0.05)
    pytest.fail(f"the job yielded {len(job.outputs())} outputs in {timeout:.0f} s, expected {count}")
