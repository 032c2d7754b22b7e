"""Tables, Plotly figures and HTML for the Gradio app, built from a `Trace` or the store's contents.

Every function here is pure: it takes engine results and returns something Gradio can display,
so the app's handlers stay short and the views can be tested without loading a model.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch

from .config import RouteSettings
from .store import AdapterRecord, Retrieved
from .trace import Iteration, TokenError, Trace

EXAMPLES_BY_DOMAIN = [
    "What is photosynthesis?",  # plants
    "How do bats find their way in the dark?",  # animals
    "What does insulin do in the body?",  # medicine
    "What is a covalent bond?",  # chemistry
    "How is cheese made?",  # food
    "What is a contract in law?",  # law
    "What is a chord in music?",  # music
    "What does a compiler do?",  # computing
    "How many players are on a football team?",  # sport
    "What is a battalion?",  # military
    "How does a river delta form?",  # geography
    "What is a prime number?",  # mathematics
    "What is inertia?",  # physics
    "What is a pilgrimage?",  # religion
    "What causes inflation?",  # economics
]
EXAMPLES_TWO_DOMAINS = [
    "What is the chemistry of baking soda in a cake?",
    "How does the physics of a vibrating string make a musical note?",
    "Which plants are used to make medicines?",
]
EXAMPLES_TRANSLATION = [
    "Translate 'tree' into German.",
    "Translate 'house' into French.",
    "Translate 'water' into Spanish.",
]

def control_help(defaults: RouteSettings) -> dict[str, str]:
    """Return one help line per control of the query view, saying what it sets and in what unit."""
    return {
        "Reference answer": "Optional. With a reference, the error metric auto scores each reference token by its "
                            "negative log-likelihood instead of scoring the generated answer.",
        "Top-k": "How many adapters the first iteration retrieves from the store.",
        "Temperature": "Softmax temperature that turns similarities into merge weights; lower puts more weight on "
                       "the best match.",
        "Merge method": "How the weighted adapters are combined; the About tab describes each method.",
        "Error metric": "Per-token error in nats: surprisal of each generated token, entropy of the next-token "
                        "distribution, or NLL of the reference; auto picks NLL when a reference is given.",
        "Threshold": "Mean per-token error (nats) at or below which an answer is accepted.",
        "Maximum iterations": "Upper bound on retrieve-merge-generate-check rounds per query.",
        "Refinement strategy": "What the next iteration retrieves when the error is above the threshold.",
        "Maximum new tokens": "Tokens generated per iteration at most, for the merged and the base model.",
        "Sampling": f"Sample (temperature {defaults.sampling_temperature}, top-p {defaults.top_p}, seed "
                    f"{defaults.seed}) instead of greedy decoding.",
    }


STOP_REASONS = {
    "below_threshold": "the mean error fell below the threshold",
    "max_iterations": "the maximum number of iterations was reached",
    "stopped": "the request was stopped",
}
HELPS_COLOUR, HURTS_COLOUR = "#2166ac", "#b2182b"  # the ends of Plotly's RdBu scale, as in the contribution heatmap
DECISION_COLOURS = {"accept": "#2e7d32", "refine": "#ef6c00", "stop": "#757575"}

# Sequential colour scale for per-token error (ColorBrewer YlOrRd end points and middle).
ERROR_COLOURSCALE = [[0.0, "#ffffcc"], [0.5, "#fd8d3c"], [1.0, "#bd0026"]]
_ERROR_STOPS = [(0.0, (0xFF, 0xFF, 0xCC)), (0.5, (0xFD, 0x8D, 0x3C)), (1.0, (0xBD, 0x00, 0x26))]
DARK_TEXT_LIMIT = 0.65
"""Above this fraction of the colour scale the background is dark enough for white text."""

ADAPTER_COLUMNS = ["rank", "adapter", "id", "domain", "similarity", "weight", "error contribution", "error alone"]
TOKEN_COLUMNS = ["position", "token", "error (nats)"]
LIBRARY_COLUMNS = ["id", "name", "domain", "description", "rank", "alpha", "target modules", "keys"]
LIBRARY_COLUMN_WIDTHS = ["11%", "11%", "10%", "34%", "6%", "6%", "16%", "6%"]
FIGURE_HEIGHT = 320
MAX_MAP_LABELS = 30
"""The key map names adapters on the plot only up to this many. Beyond it the names are in the hover text."""
MAX_ANSWER_PREVIEW_CHARS = 240


# ---- shared helpers --------------------------------------------------------------------------


def empty_figure(message: str, height: int = FIGURE_HEIGHT) -> go.Figure:
    """Return a blank figure that shows `message`, so an empty result never renders as a bare axis."""
    figure = go.Figure()
    figure.add_annotation(text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                          font={"size": 14})
    figure.update_layout(height=height, xaxis={"visible": False}, yaxis={"visible": False},
                         template="plotly_white", margin={"l": 20, "r": 20, "t": 30, "b": 20})
    return figure


def _layout(figure: go.Figure, title: str, height: int = FIGURE_HEIGHT) -> go.Figure:
    figure.update_layout(title={"text": title, "font": {"size": 15}}, height=height, template="plotly_white",
                         margin={"l": 60, "r": 20, "t": 50, "b": 50})
    return figure


def error_scale_max(threshold: float, errors: Sequence[float]) -> float:
    """Top of the error colour scale in nats: twice the threshold, so the threshold sits at its middle."""
    if threshold > 0:
        return 2.0 * threshold
    return max([*errors, 1.0])


def error_colour(error: float, scale_max: float) -> tuple[str, str]:
    """Return the (background, text) colours for `error` on the YlOrRd scale from 0 to `scale_max`."""
    fraction = min(max(error / scale_max, 0.0), 1.0) if scale_max > 0 else 0.0
    for (low, low_rgb), (high, high_rgb) in zip(_ERROR_STOPS, _ERROR_STOPS[1:]):
        if fraction <= high:
            mix = (fraction - low) / (high - low)
            rgb = [round(a + (b - a) * mix) for a, b in zip(low_rgb, high_rgb)]
            break
    text = "#ffffff" if fraction > DARK_TEXT_LIMIT else "#1a1a1a"
    return "#{:02x}{:02x}{:02x}".format(*rgb), text


def visible_token(text: str) -> str:
    """Show whitespace-only tokens as symbols, so they can be seen in a chart or a table."""
    if text == "":
        return "∅"
    if text.strip() == "":
        return text.replace(" ", "·").replace("\n", "↵").replace("\t", "→")
    return text


# ---- query view ------------------------------------------------------------------------------


def adapter_table(iteration: Iteration | None) -> pd.DataFrame:
    """Tabulate the adapters of one iteration: rank, name, similarity, weight and error contribution."""
    rows = []
    for rank, use in enumerate(iteration.adapters if iteration else [], start=1):
        rows.append({
            "rank": rank, "adapter": use.name, "id": use.id, "domain": use.domain,
            "similarity": round(use.similarity, 4), "weight": round(use.weight, 4),
            "error contribution": None if use.contribution is None else round(use.contribution, 4),
            "error alone": None if use.alone_error is None else round(use.alone_error, 4),
        })
    return pd.DataFrame(rows, columns=ADAPTER_COLUMNS)


def no_adapter_message(library_size: int) -> str:
    if library_size == 0:
        return "The adapter library is empty, so the base model answered alone."
    return "No adapter was used in this iteration, so the base model answered alone."


def weight_figure(iteration: Iteration | None, library_size: int) -> go.Figure:
    """Plot the relevance weights of one iteration's adapters as bars, largest at the top."""
    if iteration is None:
        return empty_figure("Run a query to see the relevance weights.")
    if not iteration.adapters:
        return empty_figure(no_adapter_message(library_size))
    uses = sorted(iteration.adapters, key=lambda use: use.weight)
    figure = go.Figure(go.Bar(
        x=[use.weight for use in uses], y=[use.name for use in uses], orientation="h",
        marker={"color": "#3f6fb5"},
        text=[f"{use.weight:.2f} (similarity {use.similarity:.2f})" for use in uses], textposition="auto",
        customdata=[[use.id, use.domain, use.similarity] for use in uses],
        hovertemplate="%{customdata[0]} (%{customdata[1]})<br>weight %{x:.3f}<br>similarity %{customdata[2]:.3f}"
                      "<extra></extra>",
    ))
    figure.update_xaxes(title="relevance weight", range=[0, 1.05])
    height = max(FIGURE_HEIGHT, 90 + 36 * len(uses))
    return _layout(figure, f"Relevance weights, iteration {iteration.index + 1}", height)


def scored_text_label(iteration: Iteration) -> str:
    """Say which text the per-token error is measured on and with which metric."""
    if iteration.error_metric == "nll":
        return "Reference answer, coloured by its negative log-likelihood under the merged model"
    return f"Generated answer, coloured by {iteration.error_metric}"


def _token_spans(tokens: Sequence[TokenError], scale_max: float) -> str:
    spans = []
    for position, token in enumerate(tokens):
        background, colour = error_colour(token.error, scale_max)
        special = token.text.startswith("<|") and token.text.endswith("|>")
        text = html.escape(visible_token(token.text) if not special else token.text)
        # the light right edge separates neighbouring tokens of the same colour
        style = f"background:{background};color:{colour};border-radius:3px;box-shadow:inset -1px 0 0 #ffffffb0;"
        if special:
            style += "font-style:italic;font-size:0.8em;"
        tooltip = html.escape(f"token {position}: {token.text!r}, error {token.error:.3f} nats", quote=True)
        spans.append(f'<span class="moa-token" style="{style}" title="{tooltip}">{text}</span>')
    return "".join(spans)


def _colour_legend(scale_max: float, threshold: float) -> str:
    low, _ = error_colour(0.0, scale_max)
    middle, _ = error_colour(scale_max / 2, scale_max)
    high, _ = error_colour(scale_max, scale_max)
    middle_label = f"threshold {threshold:.2f}" if threshold > 0 else f"{scale_max / 2:.2f}"
    return (
        '<div class="moa-legend" style="display:flex;align-items:center;gap:8px;font-size:0.85em;margin-top:6px;">'
        "<span>0 nats</span>"
        f'<span style="width:180px;height:12px;border-radius:3px;background:linear-gradient(to right,{low},'
        f'{middle},{high});"></span>'
        f"<span>{scale_max:.2f}+ nats</span><span style=\"opacity:0.75\">(middle: {middle_label})</span></div>"
    )


def token_heatmap_html(iteration: Iteration | None) -> str:
    """Render the scored text with each token's background coloured by its error.

    With the nll metric the scored tokens are the reference's, so the generated answer is shown
    as well, coloured by its surprisal.
    """
    if iteration is None:
        return '<p class="moa-note">Run a query to see the answer coloured by per-token error.</p>'
    scale_max = error_scale_max(iteration.threshold, [token.error for token in iteration.tokens])
    blocks = [(scored_text_label(iteration), iteration.tokens)]
    if iteration.error_metric == "nll":
        blocks.append(("Generated answer, coloured by surprisal", iteration.answer_tokens))
    parts = ['<div class="moa-heatmap">']
    for label, tokens in blocks:
        parts.append(f'<div style="font-size:0.85em;opacity:0.8;margin:4px 0;">{html.escape(label)}</div>')
        if tokens:
            parts.append('<div class="moa-tokens" style="white-space:pre-wrap;line-height:1.9;font-size:1.05em;">'
                         f"{_token_spans(tokens, scale_max)}</div>")
        else:
            parts.append('<p class="moa-note">No tokens were scored.</p>')
    parts.append(_colour_legend(scale_max, iteration.threshold))
    parts.append("</div>")
    return "".join(parts)


def token_error_table(iteration: Iteration | None) -> pd.DataFrame:
    """Tabulate the scored tokens of one iteration with their error in nats."""
    tokens = iteration.tokens if iteration else []
    rows = [{"position": position, "token": token.text, "error (nats)": round(token.error, 4)}
            for position, token in enumerate(tokens)]
    return pd.DataFrame(rows, columns=TOKEN_COLUMNS)


def error_figure(iteration: Iteration | None) -> go.Figure:
    """Plot the error of each scored token as bars, with the threshold and the mean as horizontal lines."""
    if iteration is None:
        return empty_figure("Run a query to see the error of each token.")
    if not iteration.tokens:
        return empty_figure("No tokens were scored.")
    errors = [token.error for token in iteration.tokens]
    scale_max = error_scale_max(iteration.threshold, errors)
    positions = list(range(len(errors)))
    figure = go.Figure(go.Bar(
        x=positions, y=errors,
        marker={"color": errors, "colorscale": ERROR_COLOURSCALE, "cmin": 0.0, "cmax": scale_max,
                "line": {"color": "#888888", "width": 0.5}},
        customdata=[visible_token(token.text) for token in iteration.tokens],
        hovertemplate="token %{x}: %{customdata}<br>error %{y:.3f} nats<extra></extra>",
    ))
    figure.add_hline(y=iteration.threshold, line={"color": "#c62828", "width": 2},
                     annotation_text=f"threshold {iteration.threshold:.2f}", annotation_position="top left",
                     annotation_bgcolor="rgba(255,255,255,0.8)")
    figure.add_hline(y=iteration.mean_error, line={"color": "#455a64", "width": 1.5, "dash": "dash"},
                     annotation_text=f"mean {iteration.mean_error:.2f}", annotation_position="bottom right",
                     annotation_bgcolor="rgba(255,255,255,0.8)")
    figure.update_xaxes(tickmode="array", tickvals=positions, title="token",
                        ticktext=[visible_token(token.text)[:12] for token in iteration.tokens])
    figure.update_yaxes(title=f"{iteration.error_metric} (nats)", rangemode="tozero")
    return _layout(figure, f"Error per token, iteration {iteration.index + 1}")


def _adapter_summary(iteration: Iteration) -> str:
    if not iteration.adapters:
        return "none, so the base model answered alone"
    return ", ".join(f"{html.escape(use.name)} <span style=\"opacity:0.7\">({html.escape(use.domain)})</span> "
                     f"{use.weight:.2f}" for use in iteration.adapters)


def _error_bar(iteration: Iteration) -> str:
    """Draw the mean error as a small horizontal bar with a tick at the threshold."""
    scale_max = max(2.0 * iteration.threshold, iteration.mean_error, 1e-6)
    width = 100.0 * min(iteration.mean_error / scale_max, 1.0)
    tick = 100.0 * min(iteration.threshold / scale_max, 1.0)
    colour, _ = error_colour(iteration.mean_error, error_scale_max(iteration.threshold, [iteration.mean_error]))
    return ('<div style="position:relative;width:200px;height:10px;border-radius:3px;'
            'background:rgba(128,128,128,0.2);display:inline-block;vertical-align:middle;">'
            f'<div style="width:{width:.1f}%;height:100%;border-radius:3px;background:{colour};"></div>'
            f'<div style="position:absolute;left:{tick:.1f}%;top:-3px;width:2px;height:16px;background:#c62828;">'
            "</div></div>")


def _timeline_item(iteration: Iteration, chosen: bool) -> str:
    colour = DECISION_COLOURS.get(iteration.decision, "#757575")
    decision = iteration.decision or "running"
    badge = (f'<span style="background:{colour};color:#fff;border-radius:4px;padding:1px 7px;font-size:0.85em;">'
             f"{html.escape(decision)}</span>")
    chosen_badge = (' <span style="border:1px solid currentColor;border-radius:4px;padding:0 6px;'
                    'font-size:0.85em;">chosen answer</span>') if chosen else ""
    answer = iteration.answer if len(iteration.answer) <= MAX_ANSWER_PREVIEW_CHARS \
        else iteration.answer[:MAX_ANSWER_PREVIEW_CHARS] + "…"
    return (
        f'<li class="moa-iteration" style="border-left:4px solid {colour};padding:6px 10px;margin:0 0 10px 0;'
        'list-style:none;">'
        f"<div><b>Iteration {iteration.index + 1}</b> {badge}{chosen_badge} "
        f'<span style="opacity:0.7">{iteration.seconds:.1f} s · {html.escape(iteration.execution_path)} path · '
        f"{html.escape(iteration.merge_method)} merge</span></div>"
        f"<div>Mean {html.escape(iteration.error_metric)} <b>{iteration.mean_error:.3f}</b> vs threshold "
        f"{iteration.threshold:.3f} {_error_bar(iteration)}</div>"
        f"<div>Adapters: {_adapter_summary(iteration)}</div>"
        f"<div>Reason: {html.escape(iteration.reason)}</div>"
        f'<div style="opacity:0.85">Answer: <i>{html.escape(answer)}</i></div>'
        "</li>"
    )


def timeline_html(iterations: Sequence[Iteration], final_iteration: int | None = None,
                  stopped_because: str = "") -> str:
    """Render the refinement iterations in order, each with its adapters, error, decision and reason."""
    if not iterations:
        return '<p class="moa-note">The iterations of the refinement loop appear here while a query runs.</p>'
    items = "".join(_timeline_item(iteration, iteration.index == final_iteration) for iteration in iterations)
    summary = ""
    if stopped_because and final_iteration is not None:
        reason = STOP_REASONS.get(stopped_because, stopped_because)
        summary = (f"<p>The loop stopped because {html.escape(reason)}; the answer of iteration "
                   f"{final_iteration + 1}, which has the lowest mean error, is shown.</p>")
    return f'<div class="moa-timeline">{summary}<ol style="padding-left:0;margin:0;">{items}</ol></div>'


def status_markdown(trace: Trace, seconds: float, library_size: int) -> str:
    """Summarise a finished request in one or two lines."""
    if trace.stopped_by_user:
        return f"Stopped after {seconds:.1f} s; the answer is incomplete."
    best = trace.best
    count = len(trace.iterations)
    text = (f"Answered in {seconds:.1f} s after {count} iteration{'s' if count != 1 else ''}: "
            f"mean {best.error_metric} {best.mean_error:.3f} vs threshold {best.threshold:.3f} "
            f"({STOP_REASONS.get(trace.stopped_because, trace.stopped_because)}).")
    if not best.adapters:
        text += " " + no_adapter_message(library_size)
    return text


# ---- attribution -----------------------------------------------------------------------------


def token_choices(iteration: Iteration | None) -> list[tuple[str, int]]:
    """Return dropdown choices (label, token position) for the scored tokens of one iteration."""
    if iteration is None:
        return []
    return [(f"{position}: {visible_token(token.text)!r} (error {token.error:.2f})", position)
            for position, token in enumerate(iteration.tokens)]


def highest_error_position(iteration: Iteration) -> int | None:
    if not iteration.tokens:
        return None
    return max(range(len(iteration.tokens)), key=lambda position: iteration.tokens[position].error)


def attribution_figure(iteration: Iteration | None, position: int | None) -> go.Figure:
    """Plot how much removing each adapter changes the error of the token at `position`.

    Positive values mean the error rises without the adapter, so the adapter helps that token.
    """
    if iteration is None:
        return empty_figure("Run a query, then pick a token.")
    if not iteration.adapters:
        return empty_figure("No adapter was used, so there is nothing to attribute.")
    if any(not use.token_contributions for use in iteration.adapters):
        return empty_figure("Contributions were not computed for this iteration.")
    if position is None or not 0 <= position < len(iteration.tokens):
        return empty_figure("Pick a token.")
    values = [use.token_contributions[position] for use in iteration.adapters]
    names = [use.name for use in iteration.adapters]
    figure = go.Figure(go.Bar(
        x=values, y=names, orientation="h",
        marker={"color": [HELPS_COLOUR if value >= 0 else HURTS_COLOUR for value in values]},
        text=[f"{value:+.3f}" for value in values], textposition="auto",
        hovertemplate="%{y}<br>error without it minus with all: %{x:+.3f} nats<extra></extra>",
    ))
    figure.add_vline(x=0.0, line={"color": "#555555", "width": 1})
    figure.update_xaxes(title="change in error when the adapter is left out (nats); positive = it helps")
    token = iteration.tokens[position]
    height = max(FIGURE_HEIGHT - 80, 100 + 40 * len(names))
    return _layout(figure, f"Token {position} {visible_token(token.text)!r}: error {token.error:.3f} nats", height)


def contribution_heatmap(iteration: Iteration | None) -> go.Figure:
    """Plot every adapter's leave-one-out contribution at every scored token as a heatmap."""
    if iteration is None or not iteration.adapters or any(not use.token_contributions for use in iteration.adapters):
        return empty_figure("The adapter × token contributions appear here when adapters were used.")
    matrix = [use.token_contributions for use in iteration.adapters]  # (k, T)
    limit = max(max(abs(value) for row in matrix for value in row), 1e-6)
    positions = list(range(len(iteration.tokens)))
    figure = go.Figure(go.Heatmap(
        z=matrix, x=positions, y=[use.name for use in iteration.adapters], colorscale="RdBu", zmid=0.0,
        zmin=-limit, zmax=limit, colorbar={"title": {"text": "nats"}},
        customdata=[[visible_token(token.text) for token in iteration.tokens]] * len(matrix),
        hovertemplate="%{y}<br>token %{x}: %{customdata}<br>contribution %{z:+.3f} nats<extra></extra>",
    ))
    figure.update_xaxes(tickmode="array", tickvals=positions,
                        ticktext=[visible_token(token.text)[:10] for token in iteration.tokens])
    height = max(FIGURE_HEIGHT - 60, 120 + 36 * len(matrix))
    return _layout(figure, "Contribution of each adapter at each token (blue helps, red hurts)", height)


# ---- library view ----------------------------------------------------------------------------


def library_table(records: dict[str, AdapterRecord]) -> pd.DataFrame:
    """Tabulate the registered adapters with their metadata. A store contains adapters of one base model only."""
    rows = [{
        "id": record.adapter_id, "name": record.name, "domain": record.domain, "description": record.description,
        "rank": record.rank, "alpha": record.alpha, "target modules": ", ".join(record.target_modules),
        "keys": record.num_keys,
    } for record in records.values()]
    return pd.DataFrame(rows, columns=LIBRARY_COLUMNS)


def project_2d(keys: torch.Tensor, extra: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, list[float]]:
    """Project keys (n, dim) and an optional extra vector (dim,) onto the keys' first two principal components.

    Returns the key coordinates (n, 2), the extra vector's coordinates (2,) and the fraction of
    variance each component explains. With fewer than two distinct keys every point sits at 0.
    """
    keys = keys.float()
    mean = keys.mean(dim=0)
    centred = keys - mean  # (n, dim)
    _, singular_values, right_vectors = torch.linalg.svd(centred, full_matrices=False)
    components = torch.zeros(2, keys.shape[1])
    used = min(2, right_vectors.shape[0])
    components[:used] = right_vectors[:used]
    variance = singular_values.pow(2)
    total = float(variance.sum())
    explained = [float(variance[i]) / total if total > 0 and i < variance.shape[0] else 0.0 for i in range(2)]
    coordinates = centred @ components.T  # (n, 2)
    extra_coordinates = (extra.float() - mean) @ components.T if extra is not None else None  # (2,)
    return coordinates, extra_coordinates, explained


def key_map_figure(key_ids: Sequence[str], keys: torch.Tensor, records: dict[str, AdapterRecord],
                   query: str | None = None, query_embedding: torch.Tensor | None = None,
                   used_ids: Sequence[str] = ()) -> go.Figure:
    """Scatter the adapter keys on their first two principal components, coloured by domain.

    The last query is drawn as a star, with dotted lines to the adapters its answer used.
    """
    if keys.numel() == 0 or not key_ids:
        return empty_figure("The library is empty: there are no adapter keys to map.", height=480)
    coordinates, query_point, explained = project_2d(keys, query_embedding)
    figure = go.Figure()
    by_domain: dict[str, list[int]] = {}
    for row, adapter_id in enumerate(key_ids):
        domain = records[adapter_id].domain if adapter_id in records else "unknown"
        by_domain.setdefault(domain, []).append(row)
    for domain, rows in sorted(by_domain.items()):
        figure.add_trace(go.Scatter(
            x=coordinates[rows, 0].tolist(), y=coordinates[rows, 1].tolist(), mode="markers", name=domain,
            marker={"size": 9, "opacity": 0.8},
            text=[_record_name(records, key_ids[row]) for row in rows],
            customdata=[key_ids[row] for row in rows],
            hovertemplate="%{text}<br>%{customdata}<extra>" + html.escape(domain) + "</extra>",
        ))

    centroids = _adapter_centroids(key_ids, coordinates)
    if len(centroids) <= MAX_MAP_LABELS:
        figure.add_trace(go.Scatter(
            x=[point[0] for point in centroids.values()], y=[point[1] for point in centroids.values()],
            mode="text", text=[_record_name(records, adapter_id) for adapter_id in centroids],
            textposition="top center", textfont={"size": 10}, showlegend=False, hoverinfo="skip",
        ))
    if query_point is not None:
        for adapter_id in used_ids:
            if adapter_id in centroids:
                x, y = centroids[adapter_id]
                figure.add_trace(go.Scatter(x=[float(query_point[0]), x], y=[float(query_point[1]), y], mode="lines",
                                            line={"dash": "dot", "color": "#555555", "width": 1},
                                            showlegend=False, hoverinfo="skip"))
        label = query if query and len(query) <= 60 else (query or "")[:60] + "…"
        figure.add_trace(go.Scatter(
            x=[float(query_point[0])], y=[float(query_point[1])], mode="markers", name="last query",
            marker={"symbol": "star", "size": 18, "color": "#111111", "line": {"color": "#ffd600", "width": 1.5}},
            text=[label], hovertemplate="last query: %{text}<extra></extra>",
        ))
    figure.update_xaxes(title=f"PC 1 ({100 * explained[0]:.0f}% of variance)", zeroline=False)
    figure.update_yaxes(title=f"PC 2 ({100 * explained[1]:.0f}% of variance)", zeroline=False)
    return _layout(figure, "Adapter keys, first two principal components", height=480)


def _record_name(records: dict[str, AdapterRecord], adapter_id: str) -> str:
    return records[adapter_id].name if adapter_id in records else adapter_id


def _adapter_centroids(key_ids: Sequence[str], coordinates: torch.Tensor) -> dict[str, tuple[float, float]]:
    rows_by_adapter: dict[str, list[int]] = {}
    for row, adapter_id in enumerate(key_ids):
        rows_by_adapter.setdefault(adapter_id, []).append(row)
    return {adapter_id: (float(coordinates[rows, 0].mean()), float(coordinates[rows, 1].mean()))
            for adapter_id, rows in rows_by_adapter.items()}


def retriever_comparison(untrained: Sequence[Retrieved], trained: Sequence[Retrieved] | None) -> pd.DataFrame:
    """Place the plain encoder's ranking beside the trained query head's, one row per rank."""
    columns = ["rank", "plain encoder", "similarity (plain)"]
    if trained is not None:
        columns += ["trained head", "similarity (trained)"]
    rows = []
    for rank in range(max(len(untrained), len(trained or []))):
        row: dict[str, Any] = {"rank": rank + 1}
        if rank < len(untrained):
            row["plain encoder"] = untrained[rank].record.name
            row["similarity (plain)"] = round(untrained[rank].similarity, 4)
        if trained is not None and rank < len(trained):
            row["trained head"] = trained[rank].record.name
            row["similarity (trained)"] = round(trained[rank].similarity, 4)
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)


class MatrixFileError(ValueError):
    """The adapter × domain matrix file exists but does not have the expected fields or shapes."""


def load_library_matrix(path: Path) -> dict[str, Any] | None:
    """Read the adapter × domain NLL matrix, or return None when the file does not exist yet."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise MatrixFileError(f"{path} is not readable JSON: {error}") from error
    missing = [key for key in ("adapters", "domains", "nll") if key not in data]
    if missing:
        raise MatrixFileError(f"{path} lacks the field(s) {', '.join(missing)}.")
    rows, columns = len(data["adapters"]), len(data["domains"])
    if len(data["nll"]) != rows or any(len(row) != columns for row in data["nll"]):
        raise MatrixFileError(f"{path}: expected nll of shape ({rows} adapters, {columns} domains).")
    if data.get("base") is not None and len(data["base"]) != columns:
        raise MatrixFileError(f"{path}: expected one base NLL per domain ({columns}), got {len(data['base'])}.")
    return data


def matrix_figure(matrix: dict[str, Any], relative: bool) -> go.Figure:
    """Plot the mean NLL of each adapter (rows) on each domain's held-out set (columns) as a heatmap.

    With `relative`, each cell is the adapter's NLL minus the base model's on that domain, so
    negative (blue) cells are where the adapter is better than the base model.
    """
    values = [[float(value) for value in row] for row in matrix["nll"]]
    base = matrix.get("base")
    if relative and base is not None:
        values = [[value - float(base[j]) for j, value in enumerate(row)] for row in values]
        limit = max(max((abs(value) for row in values for value in row), default=0.0), 1e-6)
        colours = {"colorscale": "RdBu_r", "zmid": 0.0, "zmin": -limit, "zmax": limit}
        title, unit = "NLL minus the base model's (nats); blue is better than the base model", "Δ nats"
    else:
        colours = {"colorscale": "Viridis_r"}
        title, unit = "Mean NLL of each adapter on each domain (nats); lower is better", "nats"
    figure = go.Figure(go.Heatmap(
        z=values, x=matrix["domains"], y=matrix["adapters"], colorbar={"title": {"text": unit}},
        hovertemplate="adapter %{y}<br>domain %{x}<br>%{z:.3f}<extra></extra>", **colours,
    ))
    figure.update_xaxes(title="held-out domain", tickangle=-40)
    figure.update_yaxes(title="adapter", autorange="reversed")
    height = max(420, 140 + 24 * len(values))
    return _layout(figure, title, height)


# ---- about view ------------------------------------------------------------------------------

_DIAGRAM_BOXES = [
    # (x, y, width, lines, rounded): the steps of the loop in the order they run
    (10, 40, 90, ["query"], True),
    (130, 40, 140, ["retrieve top-k", "adapters (Chroma)"], False),
    (300, 40, 150, ["weight by relevance", "and merge the LoRAs"], False),
    (480, 40, 120, ["generate with", "the merged model"], False),
    (630, 40, 90, ["per-token", "error"], False),
    (895, 40, 95, ["answer"], True),
    (690, 150, 220, ["refine: widen, reweight,", "drop or re-query"], False),
]
_BOX_HEIGHT = 50


def _diagram_box(x: int, y: int, width: int, lines: list[str], rounded: bool) -> str:
    radius = _BOX_HEIGHT / 2 if rounded else 6
    first_line_y = y + _BOX_HEIGHT / 2 - 8 * (len(lines) - 1) + 5
    texts = "".join(f'<text x="{x + width / 2}" y="{first_line_y + 16 * i}" text-anchor="middle">{html.escape(line)}'
                    "</text>" for i, line in enumerate(lines))
    return (f'<rect x="{x}" y="{y}" width="{width}" height="{_BOX_HEIGHT}" rx="{radius}" '
            'fill="rgba(63,111,181,0.12)" stroke="currentColor"/>' + texts)


def loop_diagram_svg() -> str:
    """Draw the MoA loop as an inline SVG that follows the page's text colour (light or dark theme)."""
    boxes = "".join(_diagram_box(*box) for box in _DIAGRAM_BOXES)
    arrow = 'stroke="currentColor" fill="none" marker-end="url(#moa-arrow)"'
    arrows = "".join(f'<path d="{path}" {arrow}/>' for path in (
        "M100 65 H128", "M270 65 H298", "M450 65 H478", "M600 65 H628", "M720 65 H738",  # along the top row
        "M860 65 H893",  # check -> answer
        "M800 95 V148",  # check -> refine
        "M690 175 H200 V92",  # refine -> retrieve
    ))
    check = ('<polygon points="800,35 860,65 800,95 740,65" fill="rgba(239,108,0,0.15)" stroke="currentColor"/>'
             '<text x="800" y="61" text-anchor="middle">error ≤</text>'
             '<text x="800" y="77" text-anchor="middle">threshold?</text>')
    labels = ('<text x="877" y="58" text-anchor="middle">yes</text>'
              '<text x="792" y="126" text-anchor="end">no, and iterations left</text>'
              '<text x="942" y="110" text-anchor="middle" font-size="11">when iterations run out:</text>'
              '<text x="942" y="124" text-anchor="middle" font-size="11">the lowest-error answer</text>')
    return (
        '<svg class="moa-diagram" viewBox="0 0 1000 215" width="100%" style="max-width:1000px;font-size:13px;'
        'font-family:inherit;" role="img" aria-label="The MoA loop: query, retrieve, merge, generate, error, '
        'threshold check, then answer or refine and retrieve again">'
        '<defs><marker id="moa-arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
        'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="currentColor"/></marker></defs>'
        f'<g fill="currentColor">{boxes}{check}{labels}</g>{arrows}</svg>'
    )


def about_markdown(control_help: dict[str, str], merge_methods: dict[str, str],
                   strategies: dict[str, str]) -> str:
    """Explain the loop and every control, with one table row per merge method and strategy."""
    controls = "\n".join(f"| {name} | {text} |" for name, text in control_help.items())
    methods = "\n".join(f"| `{name}` | {text} |" for name, text in merge_methods.items())
    strategy_rows = "\n".join(f"| `{name}` | {text} |" for name, text in strategies.items())
    return f"""
1. **Retrieve.** The query is embedded and the adapters whose keys are most similar by cosine
   similarity are taken from the Chroma store. A shipped expert's key blends the centroid of its
   training questions with the centroid of its question-answer pairs.
2. **Weight and merge.** The similarities become relevance weights, and the adapters' LoRA deltas
   are merged into the base model with those weights.
3. **Generate and score.** The merged model answers, and every token gets an error in nats:
   the surprisal of the generated token, the entropy of the next-token distribution, or, with a
   reference answer, the negative log-likelihood of each reference token.
4. **Check and refine.** If the mean error is at or below the threshold the answer is accepted.
   Otherwise a refinement strategy changes what is retrieved and the loop runs again, up to the
   maximum number of iterations. The answer with the lowest mean error is returned.

Each adapter's **error contribution** is the error without that adapter minus the error with
all of them, computed by leaving each adapter out in one batched pass. A positive value means
that the adapter lowers the error.

## Controls

| control | what it sets |
| --- | --- |
{controls}

## Merge methods

| method | how the adapters are combined |
| --- | --- |
{methods}

## Refinement strategies

| strategy | what the next iteration retrieves |
| --- | --- |
{strategy_rows}
"""
