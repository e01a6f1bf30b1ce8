"""The screenshots of README's "Comparing runs in the MLflow UI", taken of real runs by headless Chromium.

    make screenshots                       # or: .venv/bin/python -m docs.screenshots [--out docs/images]
    .venv/bin/python -m docs.screenshots --root /tmp/shots               # keep the runs (and reuse them next time)

Trains a few short runs into a temporary MLflow store (a Hydra multirun over the learning rate, and a small Ray sweep
whose trials nest under its run), serves the store with `mlflow server` on a free loopback port, and walks through
the README's steps in Debian's Chromium (driven by Playwright, which then downloads no browser of its own): the
"Model training" mode, the runs table with its columns and the sweep expanded, Compare with "Show diff only" and its
parallel coordinates, and the chart view. The server is stopped by its PID however the walk ends.

The sweep's Ray runtime binds every interface, so it runs in a private network namespace (`unshare`, as root, or
as a user where user namespaces are allowed); where that is refused, the screenshots show the multirun's runs only.
The selectors are those of MLflow 3.17's UI, read from its rendered DOM; a later MLflow may need them changed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from tests.helpers.mlflow_server import mlflow_server

if TYPE_CHECKING:
    from playwright.sync_api import Page, ViewportSize

REPO = Path(__file__).resolve().parent.parent
IMAGES = REPO / "docs" / "images"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")  # Debian's package: `make screenshots` installs it
VIEWPORT: ViewportSize = {"width": 1280, "height": 800}  # the table's key columns fit; PNGs of ~40 KB
EXPERIMENT = "digits"  # the default data set names the experiment
QUIET = ("progress=none", "logger.system_metrics.enabled=false")  # no bars in a log; no system/ sampling
# The multirun: the default LeNet-5 at three learning rates, 3 epochs each (about 20 s a run on one core).
MULTIRUN = ("optim.lr=0.1,0.03,0.01", "trainer.max_epochs=3")
# The sweep: three trials of the lr_wd preset, two at a time, run to the end (fifo), so each has whole curves.
SWEEP = (
    "sweep=lr_wd", "sweep.name=lr_wd", "sweep.num_samples=3", "sweep.scheduler=fifo", "trainer.max_epochs=3",
    "ray.num_cpus=2",
)  # fmt: skip
ISOLATE = [
    "unshare", "--net", "--pid", "--fork", "--mount-proc", "--kill-child=SIGKILL",
    "sh", "-c", 'ip link set lo up && exec "$@"', "isolated",
]  # fmt: skip
COLUMNS = ("val/acc", "optim.lr", "optim.weight_decay")  # the table's added columns (3 fit beside the names)
KEEP_SECTIONS = ("train", "val")  # the chart view's sections left open (README: collapse the others)
CHART_FILTER = "loss"  # the chart view's shot: one chart of train and one of val, curves of every run
CHART_VIEWPORT: ViewportSize = {"width": 1280, "height": 1100}  # tall enough for both (MLflow sizes charts in pixels)
METRIC = "val/acc"  # the colour of the parallel coordinates
TIMEOUT_MS = 30_000  # for any one element to appear: the UI fetches runs and metric histories as it renders
SECTION_HEADER = "experiment-view-compare-runs-section-header"  # test id of a chart section's title
EXPANDER = '[data-component-id$="runnamecellrenderer.tsx_46"]'  # the `+` of a run with nested runs
ROWS = ".ag-center-cols-container .ag-row"  # the runs table's rows, once each (AG Grid draws each part apart)
ROW_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def store_uri(root: Path) -> str:
    return f"sqlite:///{root}/mlruns/mlflow.db"


def train(root: Path) -> None:
    """The multirun: runs named by what they override, e.g. `lenet5-digits-affine epochs=3 lr=0.1 #3fa2`."""
    command = [sys.executable, "-m", "pipeline.train", "-m", f"paths.root={root}", *QUIET, *MULTIRUN]
    done = subprocess.run(command, cwd=REPO, env=clean_env(), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"training failed (exit {done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-3000:]}")


def sweep(root: Path) -> bool:
    """The sweep, in a private network namespace; False (and why, on stderr) where the namespace is refused."""
    isolate = ISOLATE if os.geteuid() == 0 else [ISOLATE[0], "--map-root-user", *ISOLATE[1:]]
    with tempfile.TemporaryDirectory(prefix="ray", dir="/tmp") as ray_tmp:  # Ray's socket paths: short
        command = [
            *isolate, sys.executable, "-m", "pipeline.sweep", f"paths.root={root}", *QUIET, *SWEEP,
            f"ray.temp_dir={ray_tmp}",
        ]  # fmt: skip
        done = subprocess.run(command, cwd=REPO, env=clean_env(), capture_output=True, text=True)
    if done.returncode != 0:
        print(f"the sweep failed (exit {done.returncode}), so the screenshots show no nested trials:\n"
              f"{done.stderr[-2000:]}", file=sys.stderr)  # fmt: skip
    return done.returncode == 0


def clean_env() -> dict[str, str]:
    """No tracking URI or experiment of the caller's: the runs go to the temporary store."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}


@contextmanager
def browser_page() -> Iterator[Page]:
    """A page of headless Chromium (Debian's), closed with the browser however the caller ends."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        raise SystemExit(f"{CHROMIUM} not found: install Debian's chromium (`make screenshots` does) or set CHROMIUM")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(TIMEOUT_MS)
            yield page
        finally:
            browser.close()


# The walk through the UI, one function per README step. Each waits for what it shows, not for a fixed time.


def open_training_runs(page: Page, url: str, experiment: str = EXPERIMENT) -> None:
    """Step 1: switch from "GenAI" to "Model training" (a fresh browser opens in GenAI) and open the experiment."""
    page.goto(f"{url}/#/experiments")
    page.get_by_role("button", name="Model training", exact=True).click()
    close_assistant(page)
    page.get_by_test_id("experiment-list-item-link").get_by_text(experiment, exact=True).click()
    page.locator(".ag-row").first.wait_for()


def close_assistant(page: Page) -> None:
    """MLflow opens its Assistant panel beside every page; it would take a third of the screenshot."""
    close = page.locator('[data-component-id="mlflow.assistant.chat_panel.close"]')
    if close.count():
        close.click()


def run_names(page: Page) -> list[str]:
    """The names in the runs table's "Run Name" column, top to bottom."""
    cells = page.locator('.ag-cell[col-id="attributes.`Run Name`"] a')  # in the part pinned left
    cells.first.wait_for()
    return [name.strip() for name in cells.all_inner_texts()]


def add_columns(page: Page, names: Sequence[str], hide: Sequence[str] = ("Dataset", "Models")) -> None:
    """Step 2's "Columns": show these metrics and params, hide attribute columns that would crowd them out."""
    page.get_by_role("button", name="Columns", exact=True).click()
    tree = page.get_by_test_id("column-selector-tree")
    for title in hide:
        tree.locator(f'span[title="{title}"]').click()
    search = page.get_by_placeholder("Search columns")
    for name in names:
        search.fill(name)
        # a match is drawn highlighted (its title split into pieces): match the whole text of each entry
        entry = tree.locator(".du-bois-light-tree-title").filter(has_text=re.compile(f"^{re.escape(name)}$"))
        entry.click()
    page.keyboard.press("Escape")
    page.locator(f'.ag-header-cell[col-id$="`{names[-1]}`"]').first.wait_for()


def widen_run_names(page: Page, by: int = 150) -> None:
    """Drag the "Run Name" column's edge: its default width cuts the names after the model's."""
    header = page.locator('.ag-header-cell[col-id="attributes.`Run Name`"]')
    box = header.bounding_box()
    assert box is not None, "no Run Name column"
    right, middle = box["x"] + box["width"] - 2, box["y"] + box["height"] / 2
    page.mouse.move(right, middle)
    page.mouse.down()
    page.mouse.move(right + by, middle, steps=10)
    page.mouse.up()


def expand_parents(page: Page) -> None:
    """The `+` beside a sweep's run shows its trials."""
    expanders = page.locator(EXPANDER)
    for index in range(expanders.count()):
        shown = len(row_ids(page))
        expanders.nth(index).click()
        page.wait_for_function(f"n => document.querySelectorAll('{ROWS}').length > n", arg=shown)


def row_ids(page: Page) -> list[str]:
    """Run ids of the table's rows, top to bottom (each row is drawn once per pinned and scrolled part)."""
    rows = page.locator(ROWS)
    ids = rows.evaluate_all("rows => rows.map(row => row.getAttribute('row-id'))")
    return [row for row in ids if row and ROW_RUN_ID.match(row)]


def parent_ids(page: Page) -> list[str]:
    """Run ids of the rows with a `+`/`-` beside their name: a sweep's own run."""
    return [run_id for run_id in row_ids(page) if page.locator(f'.ag-row[row-id="{run_id}"] {EXPANDER}').count()]


def select_runs(page: Page, run_ids: Sequence[str]) -> None:
    for run_id in run_ids:
        page.locator(f'.ag-row[row-id="{run_id}"] .ag-checkbox-input-wrapper').first.click()


def compare_selected(page: Page) -> None:
    """Step 3: "Compare" opens the compare page of the selected runs."""
    page.get_by_test_id("runs-compare-button").click()
    page.get_by_text("Parallel Coordinates Plot", exact=True).wait_for()


def color_by(page: Page, metric: str) -> None:
    """The parallel coordinates' colour (MLflow picks the first metric by name): this metric."""
    metrics = page.locator(".du-bois-light-select").nth(1)
    metrics.locator(".du-bois-light-select-selection-item-remove").click()
    metrics.click()
    page.keyboard.type(metric)
    page.locator(f'.du-bois-light-select-item-option[title="{metric}"]').click()
    page.keyboard.press("Escape")
    page.locator(".pcp-plot").get_by_text(metric, exact=True).first.wait_for()


def show_diff_only(page: Page) -> list[str]:
    """Turn on the params' "Show diff only"; returns the params it then lists."""
    switch = page.get_by_role("switch", name="Parameters - Show diff only")
    switch.click()
    page.wait_for_function("s => s.getAttribute('aria-checked') === 'true'", arg=switch.element_handle())
    section = page.locator(".du-bois-light-collapse-item").filter(has=switch)
    section.evaluate("element => element.scrollIntoView({block: 'start'})")  # its header at the top of the shot
    table = section.locator("table")
    return [name.strip() for name in table.locator("tr > th[scope=row]").all_inner_texts()]


def chart_view(page: Page) -> None:
    """Step 4: the chart icon beside the table."""
    page.locator('label:has(input[name="runs-view-mode"][value="CHART"])').click()
    page.get_by_test_id(SECTION_HEADER).first.wait_for()


def chart_sections(page: Page) -> dict[str, bool]:
    """The chart view's sections, top to bottom: name (a key prefix, e.g. `train`) → whether it is open."""
    found = page.locator(".du-bois-light-collapse-header").evaluate_all(
        """headers => headers
            .map(h => [h.querySelector('[data-testid="experiment-view-compare-runs-section-header"]'), h])
            .filter(([figure]) => figure)
            .map(([figure, h]) => [figure.firstElementChild.firstElementChild.textContent,
                                   h.getAttribute('aria-expanded') === 'true'])"""
    )
    return dict(found)


def collapse_sections(page: Page, keep: Sequence[str] = KEEP_SECTIONS) -> None:
    """Collapse every open section but `keep`: what README asks a user to do once and save as a view."""
    for name, open_ in chart_sections(page).items():
        if open_ and name not in keep:
            header = page.locator(".du-bois-light-collapse-header").filter(
                has=page.get_by_test_id(SECTION_HEADER).get_by_text(name, exact=True)
            )
            header.locator(".du-bois-light-collapse-arrow").click()
            page.wait_for_function("h => h.getAttribute('aria-expanded') === 'false'", arg=header.element_handle())
    # a click scrolls the charts' pane to the header it collapsed: back to the first section
    page.get_by_test_id(SECTION_HEADER).first.evaluate("element => element.scrollIntoView({block: 'start'})")


def filter_charts(page: Page, text: str) -> None:
    """The chart view's search box: only the charts whose metric contains `text`, in their sections (a section with
    none of them goes)."""
    sections = len(chart_sections(page))
    page.get_by_placeholder("Search metric charts").fill(text)
    page.wait_for_function(
        f"n => document.querySelectorAll('[data-testid=\"{SECTION_HEADER}\"]').length < n", arg=sections
    )


def save(page: Page, path: Path) -> Path:
    """A PNG of the viewport, written losslessly and palette-reduced: UI colours fit in 256, and the file shrinks
    about three times, so the repository keeps each under 300 KB."""
    from PIL import Image

    page.wait_for_timeout(500)  # transitions (hover colours, a popover closing) end
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path))
    with Image.open(path) as image:
        reduced = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    reduced.save(path, optimize=True)
    return path


def take(url: str, out: Path) -> list[Path]:
    """Walk the README's steps on the served store and save a screenshot at each."""
    taken: list[Path] = []
    with browser_page() as page:
        page.goto(f"{url}/#/experiments")
        page.get_by_role("button", name="Model training", exact=True).wait_for()
        close_assistant(page)
        taken.append(save(page, out / "1-mode-switch.png"))
        open_training_runs(page, url)
        add_columns(page, COLUMNS)
        widen_run_names(page)
        expand_parents(page)
        taken.append(save(page, out / "2-runs-table.png"))
        select_runs(page, [run for run in row_ids(page) if run not in parent_ids(page)])  # the trained runs
        taken.append(save(page, out / "3-select-compare.png"))
        compare_selected(page)
        color_by(page, METRIC)
        taken.append(save(page, out / "3-parallel-coordinates.png"))
        show_diff_only(page)
        taken.append(save(page, out / "3-diff-only.png"))
        open_training_runs(page, url)
        chart_view(page)
        collapse_sections(page)
        filter_charts(page, CHART_FILTER)
        page.set_viewport_size(CHART_VIEWPORT)
        page.locator(".js-plotly-plot .scatterlayer .trace").first.wait_for()
        taken.append(save(page, out / "4-chart-view.png"))
    return taken


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=IMAGES, help="where the PNGs go (default: docs/images)")
    parser.add_argument("--root", type=Path, help="train into this folder and keep it; reused when it has runs")
    args = parser.parse_args(argv)
    root = args.root or Path(tempfile.mkdtemp(prefix="screenshots-"))
    try:
        if not (root / "mlruns" / "mlflow.db").exists():
            started = time.monotonic()
            train(root)
            sweep(root)
            print(f"runs trained in {time.monotonic() - started:.0f} s", file=sys.stderr)
        with mlflow_server(store_uri(root), root / "server-artifacts") as url:
            for path in take(url, args.out):
                shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
                print(f"{shown}: {path.stat().st_size // 1024} KB")
    finally:
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
