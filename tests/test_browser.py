"""End to end in a real browser: headless Debian Chromium driven by Playwright loads the Space, uploads an image,
runs the analysis and checks the page a visitor sees: every output renders, an untouched age is "missing", the
results sit beside the input and above the examples at 1,280 px with the examples' columns shown in full and the
four image panels the same size, and at 420 px (a phone) nothing is wider than the screen and the image panels stack
one per row. A bad upload shows an error message and the page keeps working. Screenshots at both widths go to
$SCREENSHOT_DIR (or the test's tmp folder).

Needs `/usr/bin/chromium` (Debian package `chromium`) and the `playwright` package; never `playwright install`.
Skipped when either is missing, except under CI (CI=true), where it must run.
"""

import os
import socket

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no calls home

from conftest import LABELS  # noqa: E402
from test_space import EXAMPLE, import_space_app, space_model  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
try:
    from playwright import sync_api
except ImportError:  # under CI this must fail, not skip
    sync_api = None
if sync_api is None or not os.path.exists(CHROMIUM):
    missing = "the playwright package" if sync_api is None else CHROMIUM
    if not os.environ.get("CI"):
        pytest.skip(f"browser test skipped: {missing} is not installed", allow_module_level=True)
    raise RuntimeError(
        f"CI=true but {missing} is missing; install it (`apt-get install chromium`, `pip install playwright`): the "
        "browser test must run in CI."
    )

pytestmark = [pytest.mark.slow, pytest.mark.browser]
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
TIMEOUT_MS = 60_000  # model loading and the first inference on 2 busy cores
sync_api.expect.set_options(timeout=TIMEOUT_MS)
IMAGE_PANELS = ("#mask-overlay", "#lesion-image", "#cam-image", "#cam-lesion")


def serve(model: str):
    """The Space serving `model` on a free local port: yields its URL, closes it after."""
    app = import_space_app()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    demo = app.build(model)
    _, url, _ = demo.launch(
        server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **app.launch_options()
    )
    yield url
    demo.close()


@pytest.fixture(scope="module")
def app_url(tmp_path_factory, saved_tiny_classifier):
    yield from serve(str(space_model(tmp_path_factory.mktemp("browser") / "model", saved_tiny_classifier)))


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield chromium
        chromium.close()


def open_page(browser, width: int):
    page = browser.new_page(viewport={"width": width, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    return page


def screenshot_path(tmp_path, name: str) -> str:
    folder = os.environ.get("SCREENSHOT_DIR") or str(tmp_path)
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, name)


def wait_for_image(page, selector: str) -> None:
    image = page.locator(selector)
    image.wait_for(state="attached")
    # Output images load lazily, only once near the viewport: on a phone the last panels sit far below it.
    page.eval_on_selector(selector, "el => el.scrollIntoView({block: 'center'})")
    image.wait_for()
    # Output images load lazily; wait until the pixels are there, not just the element.
    page.wait_for_function("i => i.complete && i.naturalWidth > 0", arg=image.element_handle())


def analyse(page, url: str, image=EXAMPLE) -> None:
    """Upload `image`, leave the optional fields alone, run the analysis and wait for every output image."""
    page.goto(url)
    page.locator("#image input[type=file]").set_input_files(str(image))
    page.locator("#image img").wait_for()  # the upload preview
    page.locator("#run").click()
    for panel in IMAGE_PANELS:
        wait_for_image(page, f"{panel} img")


def box(page, selector: str) -> dict:
    found = page.locator(selector).first.bounding_box()
    assert found is not None, f"{selector} is not rendered"
    return found


def overflowing(page, selector: str) -> list[str]:
    """Texts of the elements under `selector` whose content is cut (wider than their box)."""
    return page.eval_on_selector_all(
        selector,
        "els => els.filter(e => e.scrollWidth > e.clientWidth + 1).map(e => e.innerText || e.outerHTML.slice(0, 80))",
    )


def test_desktop_page_renders_every_output_beside_the_input(app_url, browser, tmp_path):
    expect = sync_api.expect
    page = open_page(browser, 1280)
    analyse(page, app_url)
    expect(page.locator("#disclaimer")).to_contain_text("not a medical device")
    expect(page.locator("#model-info")).to_contain_text("HAM10000")
    top = page.locator("#probabilities [data-testid=label-output-value]")
    expect(top).to_have_count(1)
    assert top.inner_text().strip() in LABELS
    expect(page.locator("#focus")).to_contain_text("image branch")
    expect(page.locator("#focus")).to_contain_text("lesion branch")
    # The age box was left alone: the model was told nothing, and the table says so (not "age 0").
    expect(page.locator("#metadata tr", has_text="age")).to_contain_text("missing")
    for field in ("sex", "site"):
        expect(page.locator("#metadata tr", has_text=field)).to_contain_text("missing")
    page.screenshot(path=screenshot_path(tmp_path, "space_1280.png"), full_page=True)

    inputs, results, examples = box(page, "#inputs"), box(page, "#results"), box(page, "#examples")
    # Side by side: the results start right of the input column, level with it.
    assert results["x"] >= inputs["x"] + inputs["width"] - 1 and abs(results["y"] - inputs["y"]) < 40
    # Every result (the image panels included) is above the examples: no scrolling past them to see the output.
    panels = [box(page, panel) for panel in IMAGE_PANELS]
    assert all(panel["y"] + panel["height"] <= examples["y"] + 1 for panel in panels)
    # The four image panels, the lesion image's included, have the same size, two per row.
    first = panels[0]
    for panel in panels[1:]:
        assert abs(panel["width"] - first["width"]) <= 2 and abs(panel["height"] - first["height"]) <= 2, panels
    assert abs(panels[0]["y"] - panels[1]["y"]) <= 2 and panels[2]["y"] > panels[0]["y"] + first["height"] - 2
    # The examples table shows every column (image, age, sex, site) in full.
    table, block = box(page, "#examples table"), box(page, "#examples")
    assert table["x"] + table["width"] <= block["x"] + block["width"]
    expect(page.locator("#examples table")).to_contain_text("anterior torso")
    assert overflowing(page, "#examples td, #examples th") == []
    page.close()


def test_phone_page_stacks_the_panels_and_cuts_nothing(app_url, browser, tmp_path):
    page = open_page(browser, 420)
    analyse(page, app_url)
    page.screenshot(path=screenshot_path(tmp_path, "space_420.png"), full_page=True)
    assert page.evaluate("document.documentElement.scrollWidth") <= 420  # no sideways scrolling
    panels = [box(page, panel) for panel in IMAGE_PANELS]
    for panel in panels:
        assert panel["x"] >= 0 and panel["x"] + panel["width"] <= 420, panel
    # One image per row, each below the previous one.
    assert all(lower["y"] >= upper["y"] + upper["height"] - 2 for upper, lower in zip(panels, panels[1:])), panels
    # Results follow the input, then the examples; no label is cut.
    assert box(page, "#results")["y"] >= box(page, "#inputs")["y"] + box(page, "#inputs")["height"] - 2
    assert overflowing(page, "[data-testid=block-label], label, #examples td, #examples th") == []
    # Every column of the examples table is on the screen (none hidden past the right edge).
    cells = page.eval_on_selector_all(
        "#examples td, #examples th", "els => els.map(e => e.getBoundingClientRect().right)"
    )
    assert cells and max(cells) <= 420, cells
    page.close()


def test_example_picker_fills_the_inputs(app_url, browser):
    expect = sync_api.expect
    page = open_page(browser, 1280)
    page.goto(app_url)
    page.locator("#examples [data-testid=dataset-cell-0-0]").click()  # the first example row
    page.locator("#image img").wait_for()
    expect(page.locator("#age input")).to_have_value("55")
    expect(page.locator("#site input")).to_have_value("anterior torso")
    page.close()


def test_bad_upload_shows_an_error_and_the_page_keeps_working(app_url, browser, tmp_path):
    from PIL import Image

    expect = sync_api.expect
    tiny = tmp_path / "tiny.png"
    Image.open(EXAMPLE).resize((10, 10)).save(tiny)
    page = open_page(browser, 1280)
    page.goto(app_url)
    page.locator("#image input[type=file]").set_input_files(str(tiny))
    page.locator("#image img").wait_for()
    page.locator("#run").click()
    expect(page.get_by_text("at least 32 pixels")).to_be_visible()
    # The same page then analyses a good image.
    page.locator("#image button[aria-label='Remove Image']").click()
    page.locator("#image input[type=file]").set_input_files(str(EXAMPLE))
    page.locator("#image img").wait_for()
    page.locator("#run").click()
    wait_for_image(page, "#cam-lesion img")
    expect(page.locator("#probabilities [data-testid=label-output-value]")).to_have_count(1)
    page.close()


@pytest.fixture(scope="module")
def shipped_url():
    """The Space serving the shipped release checkpoint (its out-of-distribution gate and referral point)."""
    from conftest import CHECKPOINT

    yield from serve(str(CHECKPOINT))


def test_non_dermoscopic_upload_is_refused_and_a_lesion_is_diagnosed(shipped_url, browser, tmp_path):
    from PIL import Image, ImageDraw

    page = open_page(browser, 1280)
    notes = tmp_path / "notes.png"
    picture = Image.new("RGB", (640, 480), "white")
    draw = ImageDraw.Draw(picture)
    for row in range(12):
        draw.text((20, 20 + 36 * row), "Meeting notes: invoice, follow-up, results pending", fill="black")
    picture.save(notes)
    analyse(page, shipped_url, notes)
    expect = sync_api.expect
    expect(page.locator("#assessment")).to_contain_text("does not look like a dermoscopic image")
    expect(page.locator("#probabilities [data-testid=label-output-value]")).to_have_count(0)
    page.screenshot(path=screenshot_path(tmp_path, "refused-1280.png"), full_page=True)

    analyse(page, shipped_url, EXAMPLE)
    expect(page.locator("#assessment")).to_contain_text("operating point")
    expect(page.locator("#assessment")).not_to_contain_text("does not look like")
    expect(page.locator("#probabilities [data-testid=label-output-value]")).to_have_count(1)
