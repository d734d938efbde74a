"""The Gradio Space (`space/app.py`): `predict()` called directly, a real server hit by `gradio_client` (good and bad
inputs, 50 visitors at once, the queue bound, the upload limit, the API's names), the page when the model cannot be
loaded, and the Space metadata."""

import ast
import importlib
import re
import shutil
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from conftest import LABELS, SPACE
from huggingface_hub import ModelCard, SpaceCard
from PIL import Image

EXAMPLE = SPACE / "examples" / "ISIC_0000000.jpg"
OUTPUTS = ("mask_overlay", "lesion_image", "cam_image", "cam_lesion", "probabilities", "focus", "metadata")
OUTPUTS += ("assessment", "trust")
TRAINING_DATA = "HAM10000 — a randomly initialised tiny model for the Space tests."


def import_space_app():
    if str(SPACE) not in sys.path:
        sys.path.insert(0, str(SPACE))
    return importlib.import_module("app")


def space_model(folder: Path, saved: Path) -> Path:
    """The shared tiny Hub folder (conftest's `saved_tiny_classifier`) copied, with a model card saying what it was
    trained on, as an export has."""
    shutil.copytree(saved, folder)
    front = "---\nlicense: cc-by-nc-4.0\ndatasets:\n- ham10000\n---\n"
    card = ModelCard(f"{front}# tiny\n\n## Training data\n\n{TRAINING_DATA}\n")
    card.save(folder / "README.md")
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def app():
    return import_space_app()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, saved_tiny_classifier) -> str:
    return str(space_model(tmp_path_factory.mktemp("space") / "model", saved_tiny_classifier))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("space_inputs")
    rgb = Image.open(EXAMPLE).convert("RGB")
    paths = {
        "rgb": folder / "lesion.jpg",
        "gray": folder / "gray.png",
        "rgba": folder / "rgba.png",
        "tiny": folder / "tiny.png",
        "text": folder / "notes.png",  # an image extension does not make it an image
        "truncated": folder / "truncated.jpg",
        "bomb": folder / "bomb.png",
        "huge_bomb": folder / "huge_bomb.png",
    }
    rgb.save(paths["rgb"])
    rgb.convert("L").save(paths["gray"])
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgb.size))
    rgba.save(paths["rgba"])
    rgb.resize((10, 10)).save(paths["tiny"])
    paths["text"].write_text("this is not an image\n")
    paths["truncated"].write_bytes(paths["rgb"].read_bytes()[:2000])
    # 1-bit PNGs compress to a few KB but declare 64 MP (over the app's cap, under PIL's own 2x bomb error) and
    # 100 MP (over PIL's limit as the app sets it, so PIL itself refuses them).
    Image.new("1", (8000, 8000)).save(paths["bomb"])
    Image.new("1", (10000, 10000)).save(paths["huge_bomb"])
    return paths


# --------------------------------------------------------------------------------------------------------------------
# predict() called directly
# --------------------------------------------------------------------------------------------------------------------
def check_outputs(outputs: tuple, size: tuple[int, int], labels: list[str]) -> None:
    assert len(outputs) == len(OUTPUTS)
    mask_overlay, lesion_image, cam_image, cam_lesion, probabilities, focus, metadata, assessment, trust = outputs
    assert "no out-of-distribution gate" in assessment  # the tiny test model has none
    assert trust["in_distribution"] is None and 0.0 <= trust["malignancy_score"] <= 1.0
    for image in (mask_overlay, cam_image, cam_lesion):
        assert isinstance(image, Image.Image) and image.size == size and image.mode == "RGB"
    assert isinstance(lesion_image, Image.Image) and max(lesion_image.size) >= 256  # enlarged for display
    assert list(probabilities) == labels
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-4)
    assert all(0.0 <= p <= 1.0 for p in probabilities.values())
    assert "| image branch |" in focus and "| lesion branch |" in focus
    assert metadata.startswith("**Metadata used**")


def test_model_loads_once_with_its_vocabularies_and_training_data(app, tiny_model):
    model = app.get_model(tiny_model)
    assert model.ok, model.error
    assert app.get_model(tiny_model) is model  # loaded once, then reused
    assert model.labels == LABELS
    assert model.site_choices[0] == "unknown" and "posterior torso" in model.site_choices
    assert model.training_data == TRAINING_DATA  # the card's "Training data" section


def test_training_data_falls_back_to_the_card_front_matter(app, tmp_path):
    ModelCard("---\ndatasets:\n- ham10000\n- isic2017\n---\n# A card without a training-data section\n").save(
        tmp_path / "README.md"
    )
    assert app.describe_training_data(str(tmp_path)) == "ham10000, isic2017"
    assert app.describe_training_data(str(tmp_path / "no-card")) == "unknown"


def test_predict_with_metadata(app, tiny_model, images):
    outputs = app.predict(str(images["rgb"]), 55, "female", "anterior torso", source=tiny_model)
    check_outputs(outputs, Image.open(images["rgb"]).size, app.get_model(tiny_model).labels)
    metadata = outputs[6]
    assert "| age | 55 |" in metadata and "| sex | female |" in metadata and "| site | anterior torso |" in metadata
    assert "missing" not in metadata


def test_predict_without_metadata_reports_missing_fields(app, tiny_model, images):
    outputs = app.predict(str(images["rgb"]), None, "unknown", "", source=tiny_model)
    for field in ("age", "sex", "site"):
        assert f"| {field} | missing (treated as unknown) |" in outputs[6]
    # An untouched age box is missing, not age 0: the same image with age 0 given gives other probabilities.
    with_zero = app.predict(str(images["rgb"]), 0, "unknown", "", source=tiny_model)
    assert "| age | 0 |" in with_zero[6]
    assert outputs[4] != pytest.approx(with_zero[4], abs=1e-6)


@pytest.mark.parametrize(("age", "sex", "site"), [(130, None, None), ("old", None, None), (None, "robot", "moon")])
def test_predict_says_which_metadata_it_could_not_read(app, tiny_model, images, age, sex, site):
    """The pipeline parses the raw fields (out-of-range ages and unknown strings fall back to missing); the page says
    which entries it did not understand instead of silently dropping them."""
    metadata = app.predict(str(images["rgb"]), age, sex, site, source=tiny_model)[6]
    for name, value in (("age", age), ("sex", sex), ("site", site)):
        if value is not None:
            assert f"| {name} | missing ({value!r} not understood, treated as unknown) |" in metadata


@pytest.mark.parametrize("kind", ["gray", "rgba"])
def test_predict_converts_grayscale_and_transparent_images(app, tiny_model, images, kind):
    image = Image.open(images[kind])
    assert image.mode == {"gray": "L", "rgba": "RGBA"}[kind]
    check_outputs(app.predict(str(images[kind]), source=tiny_model), image.size, app.get_model(tiny_model).labels)


def test_predict_applies_the_exif_rotation_of_an_upload(app, tiny_model, tmp_path):
    """A phone photo stored sideways with an EXIF orientation tag is analysed upright (by the pipeline's reader)."""
    stored = Image.open(EXAMPLE).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    path = tmp_path / "sideways.jpg"
    stored.save(path, exif=exif)
    outputs = app.predict(str(path), source=tiny_model)
    check_outputs(outputs, (stored.height, stored.width), LABELS)


def test_predict_accepts_pil_and_numpy_images(app, tiny_model, images):
    image = Image.open(images["rgb"])
    labels = app.get_model(tiny_model).labels
    from_pil = app.predict(image, source=tiny_model)
    from_array = app.predict(np.asarray(image.convert("RGB")), source=tiny_model)
    check_outputs(from_pil, image.size, labels)
    assert from_pil[4] == pytest.approx(from_array[4])


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        (None, "No image"),
        ("text", "notes.png"),
        ("truncated", "truncated.jpg"),
        ("tiny", "at least 32 pixels"),
        ("bomb", "more than the limit of 40 megapixels"),
        ("huge_bomb", "decompression bomb"),
    ],
)
def test_predict_rejects_bad_images_with_a_clear_message(app, tiny_model, images, kind, message):
    image = None if kind is None else str(images[kind])
    with pytest.raises(gr.Error, match=message) as caught:
        app.predict(image, source=tiny_model)
    assert str(images["rgb"].parent) not in caught.value.message  # the file's name, never the server's folder
    if kind in ("text", "truncated"):  # the pipeline's one reader says why it cannot read the file
        assert "image" in caught.value.message.lower()


def test_messages_name_no_server_path(app):
    upload = "/tmp/gradio/5f0c2b7e9a/ISIC 1.png"
    message = f"Cannot read {upload} as an image: cannot identify image file '{upload}'"
    assert app.public_message(message, upload, "ISIC 1.png") == (
        "Cannot read ISIC 1.png as an image: cannot identify image file 'ISIC 1.png'"
    )
    assert app.public_message("No such file: /srv/models/skin-dualnet/config.json") == "No such file: config.json"
    assert app.display_name(str(app.SHIPPED_MODEL)) == "checkpoints/skin-dualnet-small"
    assert app.display_name("/srv/models/skin-dualnet") == "skin-dualnet" and app.display_name("org/x") == "org/x"


def test_predict_rejects_bad_arrays(app, tiny_model):
    with pytest.raises(gr.Error, match="at least 32 pixels"):
        app.predict(np.zeros((10, 10, 3), dtype=np.uint8), source=tiny_model)
    with pytest.raises(gr.Error, match="shape"):
        app.predict(np.zeros((4, 4, 4, 4), dtype=np.uint8), source=tiny_model)


def test_examples_exist_and_use_the_model_vocabulary(app, tiny_model):
    model = app.get_model(tiny_model)
    rows = app.examples()
    assert len(rows) >= 3
    for path, age, sex, site in rows:
        assert Path(path).is_file()
        with Image.open(path) as image:
            assert max(image.size) <= 512
        assert 0 <= float(age) <= 120 and sex in model.sex_choices and site in model.site_choices
    assert "CC0" in (SPACE / "examples" / "ATTRIBUTION.md").read_text()


@pytest.mark.slow
def test_space_runs_the_export_through_remote_code_only(tiny_model, tmp_path):
    """As on a Space: the package is not installed, so the pipeline and the model come from the model folder."""
    from isolation import run_isolated

    output = run_isolated(
        f"""
        import os
        import sys
        sys.path.insert(0, {str(SPACE)!r})
        import app
        os.environ["SKIN_DUALNET_MODEL"] = {tiny_model!r}  # as a Space's settings give it
        try:
            model = app.get_model()
            assert model.ok, model.error
            outputs = app.predict({str(EXAMPLE)!r}, 70, "male", "head/neck")
        finally:
            del os.environ["SKIN_DUALNET_MODEL"]
        print(type(model.pipeline).__module__)
        print(max(outputs[4], key=outputs[4].get))
        """,
        cwd=tmp_path,
    )
    module, label = output.split()[-2:]
    assert module.startswith("transformers_modules.") and module.endswith("pipeline_skinlesion")
    assert label in LABELS


# --------------------------------------------------------------------------------------------------------------------
# A model that cannot be loaded
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def broken_model(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("broken_model")
    (folder / "config.json").write_text('{"model_type": "skin_dualnet", ')  # truncated JSON
    return str(folder)


def test_unloadable_model_is_reported_not_raised(app, broken_model, images):
    model = app.get_model(broken_model)
    assert not model.ok and model.error
    with pytest.raises(gr.Error, match="could not be loaded"):
        app.predict(str(images["rgb"]), source=broken_model)
    status = app.model_status(model)
    assert "could not be loaded" in status and Path(broken_model).name in status
    assert str(Path(broken_model).parent) not in status  # no server path on the page


def test_unknown_hub_id_offline_is_reported(app, monkeypatch):
    monkeypatch.setenv(app.MODEL_ENV, "org/this-model-does-not-exist")
    model = app.get_model()  # the source comes from the environment variable
    assert model.source == "org/this-model-does-not-exist" and not model.ok


def test_app_refuses_to_launch_an_unreachable_model_id_from_a_clone(app, monkeypatch):
    """`python space/app.py --model org/x` in a clone (the package is there): one line naming the local folder
    instead of a page that cannot predict (on a Space, without the package, the page shows the reason)."""
    monkeypatch.setattr(app, "build", lambda *args: pytest.fail("a Space was built for a model it cannot load"))
    with pytest.raises(SystemExit) as caught:
        app.main(["--model", "org/not-published-yet"])
    message = str(caught.value.code)
    assert "Cannot load 'org/not-published-yet'" in message and "checkpoints/skin-dualnet-small" in message
    assert "\n" not in message


def test_page_of_an_unloadable_model_says_so(app, broken_model):
    demo = app.build(broken_model)
    texts = [c.get("props", {}).get("value") for c in demo.config["components"]]
    assert any(isinstance(t, str) and "could not be loaded" in t for t in texts)
    assert any(isinstance(t, str) and "not a medical device" in t for t in texts)
    button = next(c for c in demo.config["components"] if c.get("props", {}).get("elem_id") == "run")
    assert button["props"]["interactive"] is False


# --------------------------------------------------------------------------------------------------------------------
# A real server and gradio_client
# --------------------------------------------------------------------------------------------------------------------
def launch(app, source: str) -> tuple[gr.Blocks, str]:
    demo = app.build(source)
    _, url, _ = demo.launch(
        server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True, **app.launch_options()
    )
    return demo, url


@pytest.fixture(scope="module")
def server(app, tiny_model):
    demo, url = launch(app, tiny_model)
    yield url
    demo.close()


def client_for(url: str):
    from gradio_client import Client

    return Client(url, verbose=False)


def check_remote_outputs(result: tuple, labels: list[str]) -> None:
    assert len(result) == len(OUTPUTS)
    for path in result[:4]:
        assert Path(path).is_file()
        with Image.open(path) as image:
            assert image.width > 0
    label = result[4]
    assert label["label"] in labels
    assert {c["label"] for c in label["confidences"]} <= set(labels)
    assert "lesion focus" in result[5] and "Metadata used" in result[6]
    assert set(result[8]) == {"ood_score", "in_distribution", "malignancy_score", "refer"}


def test_api_names_every_input_and_output(server):
    """What `view_api` shows an API user: every parameter and return value by its name, the optional fields with a
    default of "missing"."""
    info = client_for(server).view_api(print_info=False, return_format="dict")["named_endpoints"]["/predict"]
    parameters = {p["parameter_name"]: p for p in info["parameters"]}
    assert list(parameters) == ["image", "age", "sex", "site", "show_anyway"]
    assert parameters["image"]["parameter_has_default"] is False
    assert parameters["age"]["parameter_has_default"] and parameters["age"]["parameter_default"] is None
    returns = [r["label"] for r in info["returns"]]
    assert returns == [
        "Predicted lesion mask",
        "Lesion image (second branch input)",
        "Grad-CAM: image branch",
        "Grad-CAM: lesion branch",
        "Class probabilities",
        "Lesion focus",
        "Metadata used",
        "Assessment",
        "Trust and referral",
    ]
    assert not any(re.fullmatch(r"(value|parameter)_\d+", name) for name in [*returns, *parameters])


@pytest.mark.slow
def test_server_predicts_and_reports_bad_inputs(app, server, images):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    client = client_for(server)
    # By name, as space/README.md shows.
    result = client.predict(
        handle_file(str(images["rgb"])), age=60, sex="male", site="posterior torso", api_name="/predict"
    )
    check_remote_outputs(result, LABELS)
    assert "| age | 60 |" in result[6] and "| sex | male |" in result[6]
    # The optional fields may be left out of an API call: they mean "missing", not age 0.
    bare = client.predict(handle_file(str(images["rgb"])), api_name="/predict")
    check_remote_outputs(bare, LABELS)
    assert "| age | missing (treated as unknown) |" in bare[6]
    upload_folder = Path(gr.utils.get_upload_folder())
    for kind, message in (
        ("text", "notes.png"),
        ("truncated", "truncated.jpg"),
        ("tiny", "at least 32 pixels"),
        ("bomb", "megapixels"),
        ("huge_bomb", "decompression bomb"),
    ):
        with pytest.raises(AppError, match=message) as caught:
            client.predict(handle_file(str(images[kind])), None, "unknown", "unknown", api_name="/predict")
        shown = str(caught.value)
        # The upload lands in gradio's temporary folder (a hash per file); the message names only the file.
        assert str(upload_folder) not in shown and "/tmp" not in shown and "gradio" not in shown, shown
    with pytest.raises(AppError, match="No image"):
        client.predict(None, None, "unknown", "unknown", api_name="/predict")
    unread = client.predict(handle_file(str(images["rgb"])), "", "unknown", "moon", api_name="/predict")
    assert "| site | missing ('moon' not understood, treated as unknown) |" in unread[6]
    # Grayscale and RGBA uploads work, and the server still answers after the errors.
    for kind in ("gray", "rgba"):
        check_remote_outputs(client.predict(handle_file(str(images[kind])), api_name="/predict"), LABELS)


def rss_mb() -> float:
    """Resident memory of this process (which runs the server), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@pytest.mark.slow
def test_server_answers_50_visitors_at_once(server, images):
    """50 clients call `/predict` together: all are answered (the queue holds `QUEUE_SIZE` = 128 waiting requests),
    and while waiting each is told its place in the queue. The server's memory after the burst is printed (`-rP`)."""
    from gradio_client import Client, handle_file
    from gradio_client.utils import Status

    visitors = 50
    # A browser waits for its upload as long as it takes; on 2 busy cores that can exceed httpx's 5 s default.
    patient = {"timeout": 120}
    with ThreadPoolExecutor(16) as pool:
        clients = list(pool.map(lambda _: Client(server, verbose=False, httpx_kwargs=patient), range(visitors)))
    before = rss_mb()
    start = time.monotonic()
    upload = str(images["rgb"])
    jobs = [client.submit(handle_file(upload), None, None, None, api_name="/predict") for client in clients]
    places: dict[int, int] = {}
    while not all(job.done() for job in jobs):
        for i, job in enumerate(jobs):
            status = job.status()
            if status.code == Status.IN_QUEUE and status.rank is not None:
                places[i] = max(places.get(i, 0), status.rank + 1)
        time.sleep(0.05)
    results = [job.result(timeout=60) for job in jobs]
    elapsed = time.monotonic() - start
    after = rss_mb()
    assert len(results) == visitors
    for result in results:
        check_remote_outputs(result, LABELS)
    assert len(places) >= visitors // 2 and max(places.values()) >= visitors // 2, places
    print(
        f"50 concurrent /predict: all answered in {elapsed:.1f} s; "
        f"server RSS {before:.0f} MB before, {after:.0f} MB after"
    )


@pytest.mark.slow
def test_requests_beyond_the_queue_bound_are_refused_with_a_clear_message(app, tiny_model, images):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError
    from gradio_client.utils import QueueError

    demo = app.build(tiny_model, queue_size=2)  # the bound, small enough to overflow with a few clients
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        clients = [Client(url, verbose=False, httpx_kwargs={"timeout": 120}) for _ in range(8)]
        jobs = [client.submit(handle_file(str(images["rgb"])), api_name="/predict") for client in clients]
        outcomes = []
        for job in jobs:
            try:
                outcomes.append(job.result(timeout=120))
            except (QueueError, AppError) as error:
                outcomes.append(error)
    finally:
        demo.close()
    refused = [o for o in outcomes if isinstance(o, Exception)]
    answered = [o for o in outcomes if not isinstance(o, Exception)]
    # At most 2 running (the concurrency limit) plus 2 waiting are accepted at any moment.
    assert refused and len(answered) >= 4, outcomes
    assert all("queue is full" in str(error).lower() for error in refused), refused


@pytest.mark.slow
def test_server_refuses_uploads_over_the_size_limit(app, server, tmp_path, images):
    from gradio_client import handle_file

    big = tmp_path / "big.png"
    big.write_bytes(np.random.default_rng(0).bytes(11 * 1024 * 1024))  # over the 10 MB limit
    client = client_for(server)
    with pytest.raises(ValueError, match="exceeds the maximum file size"):
        client.predict(handle_file(str(big)), None, "unknown", "unknown", api_name="/predict")
    assert client.predict(handle_file(str(images["rgb"])), None, None, None, api_name="/predict")[4]["label"]


@pytest.mark.slow
def test_server_with_an_unloadable_model_answers_with_the_reason(app, broken_model, images):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    demo, url = launch(app, broken_model)
    try:
        with pytest.raises(AppError, match="could not be loaded"):
            client_for(url).predict(handle_file(str(images["rgb"])), None, None, None, api_name="/predict")
    finally:
        demo.close()


# --------------------------------------------------------------------------------------------------------------------
# Space metadata
# --------------------------------------------------------------------------------------------------------------------
def test_space_readme_front_matter():
    card = SpaceCard.load(SPACE / "README.md")
    assert card.data.sdk == "gradio"
    assert card.data.sdk_version == gr.__version__ == "6.31.0"
    assert (SPACE / card.data.app_file).is_file()
    assert card.data.license and len(card.data.to_dict()["short_description"]) <= 60
    assert "not a medical device" in card.text


def test_space_requirements_cover_the_imports_of_the_app_and_the_model_code(tiny_model):
    requirements = (SPACE / "requirements.txt").read_text()
    pinned = {m.group(1).lower() for m in re.finditer(r"^([A-Za-z0-9_.-]+)==", requirements, flags=re.M)}
    distributions = {"PIL": "pillow", "huggingface_hub": "huggingface-hub"}
    sources = [SPACE / "app.py", *Path(tiny_model).glob("*.py")]
    imported = set()
    for source in sources:
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    standard = set(sys.stdlib_module_names)
    local = {path.stem for path in sources} | {"modeling_skinlesion"}  # the package is optional in app.py
    third_party = {distributions.get(name, name).lower() for name in imported - standard - local}
    assert third_party <= pinned, f"space/requirements.txt lacks {sorted(third_party - pinned)}"
    assert "torch==2.14.1" in requirements and "gradio==6.31.0" in requirements


def test_shipped_checkpoint_refuses_a_non_dermoscopic_image_and_refers_by_its_operating_point(app, tmp_path):
    """The release checkpoint's gate in the Space: a page of text gets the refusal message in place of the diagnosis
    (mask and heatmaps stay; the diagnosis shows on request), a dermoscopic example gets the referral line."""
    from conftest import CHECKPOINT
    from matplotlib import font_manager
    from PIL import ImageDraw, ImageFont

    notes = Image.new("RGB", (640, 480), "white")
    draw = ImageDraw.Draw(notes)
    font = ImageFont.truetype(font_manager.findfont("DejaVu Sans"), 22)
    for row in range(12):
        draw.text((20, 20 + 36 * row), "Meeting notes: invoice, follow-up, results pending", fill="black", font=font)
    notes.save(tmp_path / "notes.png")
    source = str(CHECKPOINT)
    refused = app.predict(str(tmp_path / "notes.png"), source=source)
    assert refused[4] is None and app.REFUSAL in refused[7]
    assert refused[8]["in_distribution"] is False and refused[8]["ood_score"] > 0
    assert all(isinstance(image, Image.Image) for image in refused[:4])
    shown = app.predict(str(tmp_path / "notes.png"), show_anyway=True, source=source)
    assert set(shown[4]) == set(LABELS) and "should not be trusted" in shown[7]
    lesion = app.predict(str(EXAMPLE), 55, "female", "anterior torso", source=source)
    assert lesion[8]["in_distribution"] is True and set(lesion[4]) == set(LABELS)
    config = app.get_model(source).pipeline.model.config
    expected = "Refer for examination" if lesion[8]["refer"] else "No referral indicated at this operating point"
    assert expected in lesion[7] and f"sensitivity {config.referral_sensitivity:.2f}" in lesion[7]
