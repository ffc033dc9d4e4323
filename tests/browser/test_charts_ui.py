"""The Training view's charts read out their values: per step (hover or keyboard shows the point under the cursor)
and across runs (training loss, eval accuracy and canary perplexity by weight version).

A `loop serve` of its own with no vLLM and no training worker (the charts read only the database) and runs and
versions written straight into its SQLite file, so every figure on screen is known to the digit. The versions come
back through the real GET /api/versions, so its `run_loss` (the loss of the run that made each version) is part of
what is checked. Screenshot: test-artifacts/screenshots/training-charts.png.

Run: .venv/bin/python -m pytest -q -p no:cacheprovider tests/browser/test_charts_ui.py -m browser
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Locator, Page, expect

from loop.db.models import TrainingRun, WeightVersion
from loop.db.session import make_engine, make_sessionmaker
from tests.browser.browser_ui import UI
from tests.service import Service, _stop, start_loop
from tests.support import free_port

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

# The newest run's steps, which the per-step charts show.
LOSSES = [0.6931, 0.6012, 0.5234, 0.4321, 0.3876, 0.3512]
REWARD_ACC = [0.5, 0.5, 0.75, 0.75, 1.0, 1.0]
# Per weight version 1..3: the final loss of the run that made it, and the eval guard's figures.
RUN_LOSS = [0.5123, 0.3975, LOSSES[-1]]
ACCURACY = [0.62, 0.68, 0.71]
PERPLEXITY = [14.25, 13.5, 12.75]


@pytest.fixture(scope="module")
def ui_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """This module's service for tests/browser/conftest.py's `ui`: a loop with seeded runs and versions."""
    closed = f"http://127.0.0.1:{free_port()}"  # no vLLM: the Training view's charts need only the database
    never = {"LOOP_SCHEDULER_MIN_PAIRS": "1000000", "LOOP_SCHEDULER_INTERVAL_S": "1e9",
             "LOOP_SCHEDULER_MAX_WAIT_S": "1e9"}
    svc = start_loop(tmp_path_factory.mktemp("charts-ui"), "--vllm-url", closed, "--no-worker", env=never,
                     timeout=120, wait=False)
    try:
        _seed(svc.db_url)
        yield svc
    finally:
        _stop(svc.proc, None)


def _seed(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        with make_sessionmaker(engine)() as s:
            runs = []
            for i, loss in enumerate(RUN_LOSS):
                steps = LOSSES if i == len(RUN_LOSS) - 1 else [0.69, loss]
                history = [{"step": n + 1, "loss": v, **({"reward_accuracy": REWARD_ACC[n]} if steps is LOSSES else {})}
                           for n, v in enumerate(steps)]
                run = TrainingRun(status="succeeded", objective="dpo", trigger="manual", version_before=i,
                                  version_after=i + 1, metrics={"loss": loss}, history=history,
                                  batch={"n_pairs": 4, "n_examples": 0})
                s.add(run)
                s.flush()
                runs.append(run.id)
            for i, run_id in enumerate(runs):
                s.add(WeightVersion(version=i + 1, kind="train", parent_version=i, run_id=run_id, status="superseded",
                                    eval={"accuracy": ACCURACY[i], "canary_perplexity": PERPLEXITY[i], "n_pairs": 8}))
            s.commit()
    finally:
        engine.dispose()


def _chart(page: Page, scope: str, metric: str) -> Locator:
    figure = page.locator(f'{scope} figure.chart[data-metric="{metric}"]')
    expect(figure.locator("canvas")).to_be_visible(timeout=20_000)
    return figure


def _hover_point(figure: Locator, index: int, count: int) -> None:
    """Move the mouse over the index-th of `count` evenly spaced points (x spans the data exactly)."""
    over = figure.locator(".u-over")
    box = over.bounding_box()
    assert box is not None
    over.hover(position={"x": 1 + (box["width"] - 2) * index / (count - 1), "y": box["height"] / 2})


def _fits(figure: Locator) -> None:
    """The readout is one whole line inside its figure: nothing cut off, nothing past the card."""
    box = figure.evaluate("""(f) => { const r = f.querySelector('.chart-readout');
      const a = r.getBoundingClientRect(), b = f.getBoundingClientRect();
      return {clipped: r.scrollWidth > r.clientWidth, inside: a.left >= b.left - 0.5 && a.right <= b.right + 0.5
        && a.bottom <= b.bottom + 0.5}; }""")
    assert box == {"clipped": False, "inside": True}, box


def test_hovering_a_per_step_chart_reads_out_the_point(ui: UI) -> None:
    page = ui.go("#/training")
    loss = _chart(page, "#c-runs ~ .charts", "loss")
    acc = _chart(page, "#c-runs ~ .charts", "reward_accuracy")
    readout = loss.locator(".chart-readout")
    expect(readout).to_have_text(f"last: step 6 · loss {LOSSES[-1]}")  # nothing hovered: the newest point
    height = loss.evaluate("(f) => f.getBoundingClientRect().height")

    _hover_point(loss, 3, len(LOSSES))
    expect(readout).to_have_text(f"step 4 · loss {LOSSES[3]}")
    _fits(loss)
    assert loss.evaluate("(f) => f.getBoundingClientRect().height") == height, "hovering moved the layout"
    expect(acc.locator(".chart-readout")).to_have_text("last: step 6 · reward_accuracy 1")  # only the hovered one
    _hover_point(acc, 2, len(REWARD_ACC))
    expect(acc.locator(".chart-readout")).to_have_text("step 3 · reward_accuracy 0.7500")
    expect(readout).to_have_text(f"last: step 6 · loss {LOSSES[-1]}")  # the mouse left: back to the newest

    # The keyboard reads the same values: the chart takes focus, Home and the arrows walk the points.
    page.mouse.move(0, 0)
    loss.locator(".uplot").focus()
    expect(readout).to_have_text(f"step 6 · loss {LOSSES[-1]}")
    page.keyboard.press("Home")
    expect(readout).to_have_text(f"step 1 · loss {LOSSES[0]}")
    page.keyboard.press("ArrowRight")
    expect(readout).to_have_text(f"step 2 · loss {LOSSES[1]}")
    expect(readout).to_have_attribute("aria-live", "polite")
    ui.shot("training-charts")  # the loss chart keeps its keyboard cursor (a page scroll would end a hover)


def test_the_by_version_view_shows_training_loss_beside_accuracy_and_perplexity(ui: UI) -> None:
    page = ui.go("#/training")
    card = "section.card:has(#c-versions)"
    expect(page.locator(f"{card} h3", has_text="By weight version")).to_be_visible(timeout=20_000)
    charts = {name: _chart(page, card, name) for name in ("training loss", "eval accuracy", "canary perplexity")}
    expect(charts["training loss"].locator("figcaption")).to_have_text("training loss by version")
    expect(charts["training loss"].locator(".chart-readout")).to_have_text(
        f"last: version 3 · training loss {RUN_LOSS[2]}")
    expect(charts["eval accuracy"].locator(".chart-readout")).to_have_text(
        f"last: version 3 · eval accuracy {ACCURACY[2]:.4f}")
    expect(charts["canary perplexity"].locator(".chart-readout")).to_have_text(
        f"last: version 3 · canary perplexity {PERPLEXITY[2]}")

    # Each version's figures, hovered: the same version in all three charts (version 0, unevaluated, is left out).
    for name, values, text in (("training loss", RUN_LOSS, str), ("eval accuracy", ACCURACY, "{:.4f}".format),
                               ("canary perplexity", PERPLEXITY, "{:.2f}".format)):
        _hover_point(charts[name], 0, 3)
        expect(charts[name].locator(".chart-readout")).to_have_text(f"version 1 · {name} {text(values[0])}")
        _fits(charts[name])
    # The timeline names the run's loss beside the eval figures.
    v1 = page.locator('.tl-item[data-version="1"]')
    expect(v1.locator(".chip", has_text="train loss")).to_have_text(f"train loss {RUN_LOSS[0]}")
    expect(v1.locator(".chip", has_text="accuracy")).to_have_text(f"accuracy {ACCURACY[0]:.4f}")
    expect(v1.locator(".chip", has_text="perplexity")).to_have_text(f"perplexity {PERPLEXITY[0]}")
