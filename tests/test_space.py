"""The Gradio Space (`space/app.py`): `predict()` called directly, a real server hit by `gradio_client` (good and bad
inputs, concurrent users, the upload limit), the page when the model cannot be loaded, and the Space metadata."""

import ast
import importlib
import re
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig

from modeling_skinlesion import SkinDualNet, SkinLesionImageProcessor

REPO_ROOT = Path(__file__).resolve().parents[1]
SPACE = REPO_ROOT / "space"
EXAMPLE = SPACE / "examples" / "ISIC_0000000.jpg"
LABELS = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
OUTPUTS = ("mask_overlay", "lesion_image", "cam_image", "cam_lesion", "probabilities", "focus", "metadata")


def import_script(folder: Path, name: str):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    return importlib.import_module(name)


def export_tiny_model(folder: Path, presets: Path, training: dict | None = None) -> Path:
    """A randomly initialised tiny SkinDualNet, saved as a training script does and exported by the demo's export
    helper (`scripts/push_to_hub.py`), exactly as `bash scripts/run.sh demo` exports its weights."""
    demo = import_script(REPO_ROOT / "scripts", "demo")
    config = AutoConfig.from_pretrained(presets / "skin-dualnet-tiny.json")
    torch.manual_seed(0)
    model = SkinDualNet(config).eval()
    trained = folder / "trained"
    model.save_pretrained(trained)
    SkinLesionImageProcessor.from_model_config(config).save_pretrained(trained)
    return demo.export_model(trained, folder / "export", ["ham10000"], training)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def app():
    return import_script(SPACE, "app")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, presets) -> str:
    training = {"Demo": "a randomly initialised tiny model for the Space tests"}
    return str(export_tiny_model(tmp_path_factory.mktemp("space_model"), presets, training))


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
    mask_overlay, lesion_image, cam_image, cam_lesion, probabilities, focus, metadata = outputs
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
    assert "HAM10000" in model.training_data and "randomly initialised tiny model" in model.training_data


def test_predict_with_metadata(app, tiny_model, images):
    outputs = app.predict(str(images["rgb"]), 55, "female", "anterior torso", source=tiny_model)
    check_outputs(outputs, Image.open(images["rgb"]).size, app.get_model(tiny_model).labels)
    metadata = outputs[-1]
    assert "| age | 55.0 |" in metadata and "| sex | female |" in metadata and "| site | anterior torso |" in metadata
    assert "missing" not in metadata


def test_predict_without_metadata_reports_missing_fields(app, tiny_model, images):
    outputs = app.predict(str(images["rgb"]), None, "unknown", "", source=tiny_model)
    for field in ("age", "sex", "site"):
        assert f"| {field} | missing (treated as unknown) |" in outputs[-1]


@pytest.mark.parametrize("kind", ["gray", "rgba"])
def test_predict_converts_grayscale_and_transparent_images(app, tiny_model, images, kind):
    image = Image.open(images[kind])
    assert image.mode == {"gray": "L", "rgba": "RGBA"}[kind]
    check_outputs(app.predict(str(images[kind]), source=tiny_model), image.size, app.get_model(tiny_model).labels)


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
        ("text", "is not a readable image"),
        ("truncated", "is not a readable image"),
        ("tiny", "at least 32 pixels"),
        ("bomb", "more than the limit of 40 megapixels"),
        ("huge_bomb", "decompression bomb"),
    ],
)
def test_predict_rejects_bad_images_with_a_clear_message(app, tiny_model, images, kind, message):
    image = None if kind is None else str(images[kind])
    with pytest.raises(gr.Error, match=message) as caught:
        app.predict(image, source=tiny_model)
    if kind in ("tiny", "bomb"):  # readable images: the message is about their size only
        assert "not a readable image" not in str(caught.value)


def test_predict_rejects_bad_arrays(app, tiny_model):
    with pytest.raises(gr.Error, match="at least 32 pixels"):
        app.predict(np.zeros((10, 10, 3), dtype=np.uint8), source=tiny_model)
    with pytest.raises(gr.Error, match="expected \\(height, width"):
        app.predict(np.zeros((4, 4, 4, 4), dtype=np.uint8), source=tiny_model)


@pytest.mark.parametrize(
    ("age", "sex", "site", "message"),
    [
        (130, None, None, "between 0 and 120"),
        ("old", None, None, "must be a number"),
        (None, "robot", None, "Unknown sex 'robot'"),
        (None, None, "moon", "Unknown site 'moon'"),
    ],
)
def test_predict_rejects_bad_metadata(app, tiny_model, images, age, sex, site, message):
    with pytest.raises(gr.Error, match=message):
        app.predict(str(images["rgb"]), age, sex, site, source=tiny_model)


def test_examples_exist_and_use_the_model_vocabulary(app, tiny_model):
    model = app.get_model(tiny_model)
    rows = app.examples()
    assert len(rows) >= 3
    for path, age, sex, site in rows:
        assert Path(path).is_file()
        with Image.open(path) as image:
            assert max(image.size) <= 512
        assert 0 <= age <= 120 and sex in model.sex_choices and site in model.site_choices
    assert "CC0" in (SPACE / "examples" / "ATTRIBUTION.md").read_text()


@pytest.mark.slow
def test_space_runs_the_export_through_remote_code_only(tiny_model, tmp_path):
    """As on a Space: the package is not installed, so the pipeline and the model come from the model folder."""
    from isolation import run_isolated

    output = run_isolated(
        f"""
        import sys
        sys.path.insert(0, {str(SPACE)!r})
        import app
        model = app.get_model({tiny_model!r})
        assert model.ok, model.error
        outputs = app.predict({str(EXAMPLE)!r}, 70, "male", "head/neck")
        print(type(model.pipeline).__module__)
        print(max(outputs[4], key=outputs[4].get))
        """,
        cwd=tmp_path,
        env={"GRADIO_ANALYTICS_ENABLED": "False", "SKIN_DUALNET_MODEL": tiny_model},
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
    assert "could not be loaded" in status and broken_model in status


def test_unknown_hub_id_offline_is_reported(app, monkeypatch):
    monkeypatch.setenv(app.MODEL_ENV, "org/this-model-does-not-exist")
    model = app.get_model()  # the source comes from the environment variable
    assert model.source == "org/this-model-does-not-exist" and not model.ok


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


@pytest.mark.slow
def test_server_predicts_and_reports_bad_inputs(app, server, tiny_model, images):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    client = client_for(server)
    labels = app.get_model(tiny_model).labels
    result = client.predict(handle_file(str(images["rgb"])), 60, "male", "posterior torso", api_name="/predict")
    check_remote_outputs(result, labels)
    assert "| sex | male |" in result[6]
    # The optional fields may be left out of an API call: they mean "missing", not age 0.
    bare = client.predict(handle_file(str(images["rgb"])), api_name="/predict")
    check_remote_outputs(bare, labels)
    assert "| age | missing" in bare[6] and "0.0" not in bare[6]
    for kind, message in (
        ("text", "is not a readable image"),
        ("tiny", "at least 32 pixels"),
        ("bomb", "megapixels"),
        ("huge_bomb", "decompression bomb"),
    ):
        with pytest.raises(AppError, match=message):
            client.predict(handle_file(str(images[kind])), None, "unknown", "unknown", api_name="/predict")
    with pytest.raises(AppError, match="No image"):
        client.predict(None, None, "unknown", "unknown", api_name="/predict")
    with pytest.raises(AppError, match="Unknown site"):
        client.predict(handle_file(str(images["rgb"])), None, "unknown", "moon", api_name="/predict")
    # Grayscale and RGBA uploads work, and the server still answers after the errors.
    for kind in ("gray", "rgba"):
        check_remote_outputs(
            client.predict(handle_file(str(images[kind])), None, "unknown", "unknown", api_name="/predict"), labels
        )


@pytest.mark.slow
def test_server_serves_concurrent_users(app, server, tiny_model, images):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    labels = app.get_model(tiny_model).labels
    kinds = ["rgb", "gray", "rgba", "rgb", "tiny", "rgb", "gray", "rgb", "text", "rgba", "rgb", "rgb"]
    barrier = threading.Barrier(len(kinds))

    def request(kind: str):
        client = client_for(server)
        barrier.wait()  # all requests hit the queue together
        try:
            return kind, client.predict(handle_file(str(images[kind])), 40, "female", "unknown", api_name="/predict")
        except AppError as error:
            return kind, error

    with ThreadPoolExecutor(len(kinds)) as pool:
        results = list(pool.map(request, kinds, timeout=300))
    assert len(results) == len(kinds)
    for kind, result in results:
        if kind in ("tiny", "text"):
            assert isinstance(result, AppError), kind
        else:
            check_remote_outputs(result, labels)
    # Still answering afterwards.
    check_remote_outputs(
        client_for(server).predict(handle_file(str(images["rgb"])), None, None, None, api_name="/predict"), labels
    )


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
    text = (SPACE / "README.md").read_text()
    front = re.match(r"^---\n(.*?)\n---\n", text, flags=re.S)
    assert front, "space/README.md must start with YAML front matter"
    fields = dict(re.findall(r"^(\w+):\s*(.+)$", front.group(1), flags=re.M))
    assert fields["sdk"] == "gradio"
    assert fields["sdk_version"].strip('"') == gr.__version__ == "6.31.0"
    assert (SPACE / fields["app_file"]).is_file()
    assert fields["license"] and len(fields["short_description"].strip('"')) <= 60
    assert "not a medical device" in text


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
