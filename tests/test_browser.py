"""End to end in a real browser: headless Debian Chromium driven by Playwright loads the Space, uploads an example,
runs the analysis and checks that every output renders; a bad upload shows an error message and the page keeps
working. A screenshot goes to $SCREENSHOT_DIR (or the test's tmp folder).

Needs `/usr/bin/chromium` (Debian package `chromium`) and the `playwright` package; never `playwright install`.
Skipped when either is missing, except under CI (CI=true), where it must run.
"""

import os
import socket

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no calls home

from test_space import EXAMPLE, LABELS, SPACE, export_tiny_model, import_script  # noqa: E402

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


@pytest.fixture(scope="module")
def app_url(tmp_path_factory, presets):
    app = import_script(SPACE, "app")
    model = export_tiny_model(tmp_path_factory.mktemp("browser_model"), presets)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    demo = app.build(str(model))
    _, url, _ = demo.launch(
        server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **app.launch_options()
    )
    yield url
    demo.close()


@pytest.fixture(scope="module")
def page():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = browser.new_page(viewport={"width": 1280, "height": 900})
        pg.set_default_timeout(TIMEOUT_MS)
        yield pg
        browser.close()


def wait_for_image(page, selector: str) -> None:
    image = page.locator(selector)
    image.wait_for()
    # Output images load lazily; wait until the pixels are there, not just the element.
    page.wait_for_function("i => i.complete && i.naturalWidth > 0", arg=image.element_handle())


def test_upload_analyse_and_render_every_output(app_url, page, tmp_path):
    expect = sync_api.expect
    page.goto(app_url)
    expect(page.locator("#disclaimer")).to_contain_text("not a medical device")
    expect(page.locator("#model-info")).to_contain_text("HAM10000")
    page.locator("#image input[type=file]").set_input_files(str(EXAMPLE))
    page.locator("#image img").wait_for()  # the upload preview
    page.locator("#age input").fill("55")
    page.locator("#run").click()
    for selector in ("#mask-overlay img", "#lesion-image img", "#cam-image img", "#cam-lesion img"):
        wait_for_image(page, selector)
    top = page.locator("#probabilities [data-testid=label-output-value]")
    expect(top).to_have_count(1)
    assert top.inner_text().strip() in LABELS
    expect(page.locator("#focus")).to_contain_text("image branch")
    expect(page.locator("#focus")).to_contain_text("lesion branch")
    expect(page.locator("#metadata")).to_contain_text("55")
    expect(page.locator("#metadata")).to_contain_text("missing")  # sex and site were left unknown
    folder = os.environ.get("SCREENSHOT_DIR") or str(tmp_path)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "space_browser_test.png")
    page.screenshot(path=path, full_page=True)
    assert os.path.getsize(path) > 10_000


def test_example_picker_fills_the_inputs(app_url, page):
    expect = sync_api.expect
    page.goto(app_url)
    page.locator("#examples [data-testid=dataset-cell-0-0]").click()  # the first example row
    page.locator("#image img").wait_for()
    expect(page.locator("#age input")).to_have_value("55")
    expect(page.locator("#site input")).to_have_value("anterior torso")


def test_bad_upload_shows_an_error_and_the_page_keeps_working(app_url, page, tmp_path):
    from PIL import Image

    expect = sync_api.expect
    tiny = tmp_path / "tiny.png"
    Image.open(EXAMPLE).resize((10, 10)).save(tiny)
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
