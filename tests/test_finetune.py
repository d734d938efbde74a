"""Fine-tuning a pretrained checkpoint on a new clinic's data (`modeling_skinlesion.training.finetune` and its command
line scripts/finetune.py), end to end on real HAM10000 images relabelled as a clinic task, with its own CSV columns
and metadata spellings."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import LABELS as HAM_LABELS
from conftest import SCRIPTS, tiny_classifier
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import AutoModel

import modeling_skinlesion as sl
from modeling_skinlesion.data import column_values, load_ham10000
from modeling_skinlesion.model_card import write_model_card

sys.path.insert(0, str(SCRIPTS))
import finetune  # noqa: E402
import train_classifier  # noqa: E402

from modeling_skinlesion.training import arguments as _arguments  # noqa: E402
from modeling_skinlesion.training import finetuning as script  # noqa: E402

SCRIPT = SCRIPTS / "finetune.py"
CLINIC_NAMES = {"nv": "naevus", "mel": "melanoma"}  # everything else is "other"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny pretrained classifier (HAM10000 labels) saved with its processor and a model card, as exported."""
    folder = tmp_path_factory.mktemp("checkpoint") / "skin-dualnet"
    model = tiny_classifier()
    model.save_pretrained(folder)
    sl.SkinLesionImageProcessor.from_model_config(model.config).save_pretrained(folder)
    write_model_card(folder, model.config, datasets=["ham10000"])
    return folder


def test_finetune_shares_the_classifier_options_with_its_own_defaults(capsys):
    """finetune.py takes train_classifier.py's training, split and classifier options (same help), with four
    defaults of its own; a --column-map without `label` is a usage error."""
    required = ["--checkpoint", "c", "--images", "i", "--csv", "x.csv", "--output-dir", "o"]
    args = _arguments.parse_arguments(finetune.FinetuneArguments, [*required, "--column-map", "image=f", "label=d"])
    assert (args.epochs, args.lr, args.warmup_ratio, args.val_size) == (5, 1e-4, 0.1, 0.2)
    assert (args.batch_size, args.weight_decay, args.split_seed, args.checkpointing_steps) == (16, 1e-4, 0, "epoch")

    def helps(arguments):
        parser = _arguments.ArgumentParser(arguments)
        return {action.option_strings[0]: action.help for action in parser._actions if action.option_strings}

    mine, classifier = helps(finetune.FinetuneArguments), helps(train_classifier.TrainClassifierArguments)
    shared = set(mine) & set(classifier)
    assert {"--lr", "--val-size", "--resume", "--class-weights", "--eval-masks", "--max-grad-norm"} <= shared
    assert [option for option in shared if mine[option] != classifier[option]] == []
    with pytest.raises(SystemExit):
        _arguments.parse_arguments(finetune.FinetuneArguments, [*required, "--column-map", "image=f"])
    assert "--column-map must map `label`" in capsys.readouterr().err


@pytest.fixture(scope="module")
def clinic(data_root, tmp_path_factory):
    """60 real HAM10000 images as a clinic would send them: renamed files, its own column names, labels naevus /
    melanoma / other, sex as M/F/unspecified, and free-text sites (some unknown to the model)."""
    folder = tmp_path_factory.mktemp("clinic")
    ham = load_ham10000(data_root / "ham10000", masks=False)
    columns = {name: column_values(ham, name) for name in ("image", "label", "age", "sex", "site", "group_id")}
    rng = np.random.default_rng(0)
    chosen = []
    for labels in (["nv"], ["mel"], ["akiec", "bcc", "bkl", "df", "vasc"]):
        pool = [i for i, label in enumerate(columns["label"]) if HAM_LABELS[label] in labels]
        chosen += list(rng.choice(pool, 20, replace=False))
    (folder / "photos").mkdir()
    rows = []
    for n, i in enumerate(chosen):
        file = f"img{n:03d}.jpg"
        shutil.copy(columns["image"][i]["path"], folder / "photos" / file)
        site = columns["site"][i]
        site = "left forearm" if n % 7 == 0 else "nail" if n % 11 == 0 else site
        sex = columns["sex"][i]
        rows.append(
            {
                "filename": file,
                "dx_clinic": CLINIC_NAMES.get(HAM_LABELS[columns["label"][i]], "other"),
                "patient_age": columns["age"][i],
                "gender": "unspecified" if n % 13 == 0 else {"male": "M", "female": "F"}.get(sex, sex),
                "body_site": site,
                "lesion": columns["group_id"][i],
            }
        )
    pd.DataFrame(rows).to_csv(folder / "cases.csv", index=False)
    return folder


@pytest.mark.slow
def test_finetune_end_to_end_on_a_relabelled_clinic(checkpoint, clinic, tmp_path):
    output = tmp_path / "finetuned"
    argv = [
        "--checkpoint", str(checkpoint), "--images", str(clinic / "photos"), "--csv", str(clinic / "cases.csv"),
        "--column-map", "image=filename", "label=dx_clinic", "age=patient_age", "sex=gender", "site=body_site",
        "group_id=lesion",
        "--label-map", "naevus=nv", "melanoma=mel", "other=akiec,bcc,bkl,df,vasc",
        "--site-map", "left forearm=upper extremity",
        "--output-dir", str(output), "--epochs", "2", "--batch-size", "8", "--val-size", "0.3", "--test-size", "0.2",
        "--freeze-encoders", "--cached-views", "2",
        "--checkpointing-steps", "none",  # resuming is tested with the other training scripts
    ]  # fmt: skip
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *argv],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Validation before -> after fine-tuning: accuracy" in result.stdout + result.stderr
    report = json.loads((output / "metrics.json").read_text())

    # Labels: a new 3-class head, mapped from the checkpoint's classes.
    assert report["labels"] == ["melanoma", "naevus", "other"] and report["new_head"]
    assert report["label_map"] == {
        "naevus": ["nv"],
        "melanoma": ["mel"],
        "other": ["akiec", "bcc", "bkl", "df", "vasc"],
    }
    for stage in ("before", "after", "before_test", "after_test"):
        assert set(report[stage]["per_class_auc"]) == {"melanoma", "naevus", "other"}
        assert 0.0 <= report[stage]["balanced_accuracy"] <= 1.0 and report[stage]["num_samples"] >= 9
    assert set(report["before_test"]) - {"unmapped_classes"} == set(report["after_test"])
    assert report["before"]["unmapped_classes"] == []
    # The starting model is "epoch 0" of the selection; then the 2 epochs, trained on 2 cached views.
    assert [record["epoch"] for record in report["history"]] == [-1, 0, 1]
    assert report["kept_starting_model"] == (report["best"]["epoch"] == -1)
    assert report["cached_features"] == {"views": 2}
    assert len(list((output / "feature-cache").glob("train-view*.pt"))) == 2
    # Large images decoded once: the working copies of train + validation (HAM10000's 600 x 450 shrunk to 64 px).
    copies = report["working_copies"]
    assert sum(copies["train"].values()) + sum(copies["validation"].values()) == 48 - 0  # 60 minus the test split

    # Recalibrated for the clinic: temperature and bias, referral point (melanoma is malignant), a gate of its own.
    calibration = report["calibration"]
    assert calibration["validation_images"] == report["split"]["validation"]["images"]
    assert calibration["referral"]["malignant_labels"] == ["melanoma"]  # mapped onto mel; "other" is mixed
    assert calibration["ood_gate"]["train_images"] == report["split"]["train"]["images"]

    # Metadata: mapped spellings are recognised, unknown ones reported and treated as missing.
    site, sex = report["metadata"]["site"], report["metadata"]["sex"]
    assert report["metadata"]["added_synonyms"]["site"] == {"left forearm": "upper extremity"}
    assert set(site["unknown_as_missing"]) == {"nail"} and site["unknown_as_missing"]["nail"] >= 1
    assert site["recognised"]["upper extremity"] >= 9  # every 7th row is "left forearm"
    assert set(sex["unknown_as_missing"]) == {"unspecified"} and {"male", "female"} <= set(sex["recognised"])
    assert report["metadata"]["age"] == {"recognised": 60, "missing": 0}

    # The saved model: 3 labels, the clinic's synonyms kept, encoders and segmenter untouched, head trained.
    model = AutoModel.from_pretrained(output)
    assert model.config.id2label == {0: "melanoma", 1: "naevus", 2: "other"}
    assert model.config.temperature == pytest.approx(calibration["temperature_and_bias"]["temperature"])
    assert model.config.referral_threshold == pytest.approx(calibration["referral"]["threshold"])
    assert model.config.ood_threshold == pytest.approx(calibration["ood_gate"]["threshold"])
    assert "clinic" in model.config.ood_fitted_on and "clinic" in model.config.referral_fitted_on
    assert torch.isfinite(model.ood_gate.means).all()
    assert model.config.site_synonyms["left forearm"] == "upper extremity"
    assert len(model.config.class_weights) == 3
    base, tuned = load_file(str(checkpoint / "model.safetensors")), model.state_dict()
    frozen = [k for k in base if k.startswith(("image_encoder.", "lesion_encoder.", "segmenter."))]
    assert frozen and all(torch.equal(base[k], tuned[k]) for k in frozen)
    # The fusion is the best epoch's: trained, or the starting model's when no epoch beat it (epoch 0).
    name = "fusion.lesion_to_image.0.mlp.0.weight"
    assert torch.equal(base[name], tuned[name]) == report["kept_starting_model"]
    assert (output / "preprocessor_config.json").is_file()
    # Hub-ready like the shipped checkpoint: the analysis pipeline loads the saved folder through its remote code.
    from transformers import pipeline

    analyse = pipeline("skin-lesion-analysis", model=str(output), trust_remote_code=True)
    result = analyse(str(next((clinic / "photos").glob("*.jpg"))), explain=False)
    assert set(result["probabilities"]) == {"melanoma", "naevus", "other"} and result["in_distribution"] is not None
    splits = json.loads((output / "splits.json").read_text())
    assert len(splits["train"]) + len(splits["validation"]) + len(splits["test"]) == 60
    assert not set(splits["train"]) & set(splits["validation"]) and not set(splits["test"]) & set(splits["train"])

    # The card: fine-tuned from the checkpoint, trained on HAM10000 before, so non-commercial.
    card = ModelCard.load(output / "README.md")
    assert card.data.license == "cc-by-nc-4.0" and card.data.base_model == str(checkpoint)
    assert card.data.datasets == ["HAM10000", "clinic"]
    assert "Evaluated on dataset: clinic; split: validation" in card.text
    assert "Before fine-tuning (the base checkpoint, its classes mapped onto these)" in card.text
    assert f"| balanced_accuracy | {report['after']['balanced_accuracy']:.4f} |" in card.text
    assert "recalibrated for the clinic: temperature" in card.text and "validation images of clinic" in card.text
    assert "On the clinic's test split" in card.text


def test_new_head_starts_from_mapped_rows(checkpoint):
    base = sl.SkinDualNet.from_pretrained(checkpoint)
    mapping = script.resolve_label_map(
        ["melanoma", "naevus", "other"], HAM_LABELS, {"naevus": "nv", "melanoma": "mel"}
    )
    model = script.build_model(str(checkpoint), base, ["melanoma", "naevus", "other"], mapping, [1.0, 1.0, 2.0])
    old, new = base.classifier[-1], model.classifier[-1]
    assert new.weight.shape == (3, old.weight.shape[1])
    assert torch.equal(new.weight[0], old.weight[HAM_LABELS.index("mel")])
    assert torch.equal(new.weight[1], old.weight[HAM_LABELS.index("nv")])
    assert not any(torch.equal(new.weight[2], row) for row in old.weight)
    assert torch.equal(model.classifier[1].weight, base.classifier[1].weight)  # the rest is the checkpoint's
    # The same classes keep the whole checkpoint.
    same = script.build_model(
        str(checkpoint), base, HAM_LABELS, script.resolve_label_map(HAM_LABELS, HAM_LABELS, {}), None
    )
    assert same is base


def test_collapse_probabilities():
    probabilities = np.array([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    mapping = {"a": ["w"], "b": ["x", "y"]}  # "z" is mapped to no clinic class: its mass is dropped
    collapsed = script.collapse_probabilities(probabilities, ["w", "x", "y", "z"], ["a", "b", "c"], mapping)
    np.testing.assert_allclose(collapsed, [[1 / 6, 5 / 6, 0.0], [1 / 3, 2 / 3, 0.0]])


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        ({"melanoma": "melanoma_in_situ"}, "not classes of the checkpoint"),
        ({"lentigo": "bkl"}, "clinic class 'lentigo'"),
        ({"melanoma": "mel", "other": ["mel", "bcc"]}, "several clinic classes"),
    ],
)
def test_label_map_errors(pairs, message):
    with pytest.raises(ValueError, match=message):
        script.resolve_label_map(["melanoma", "naevus", "other"], HAM_LABELS, pairs)


def test_metadata_synonyms_must_target_the_vocabulary():
    config = sl.SkinDualNetConfig()
    added = script.extend_synonyms(config, {"Rücken": "posterior torso"}, {"X": "unknown"})
    assert config.site_synonyms["Rücken"] == "posterior torso" and added["sex"] == {"X": "unknown"}
    with pytest.raises(ValueError, match="not in the model's site vocabulary"):
        script.extend_synonyms(config, {"nail": "nail unit"}, {})


@pytest.mark.slow
def test_python_api_keeps_the_starting_model_when_no_epoch_beats_it(checkpoint, clinic, tmp_path):
    """`load_clinic` + `finetune` from Python, on the clinic's naevus / melanoma cases mapped one-to-one: with a zero
    learning rate no epoch can beat the starting model, so it is kept, and "epoch 0" gives exactly the "before"
    scores (the new head's rows are the mapped rows, the old calibration folded in); on the test split, which
    chose nothing, after = before. Then the uncached path (encoders trained) runs from the same API."""
    from modeling_skinlesion.training import ClinicData, finetune, load_clinic

    cases = pd.read_csv(clinic / "cases.csv")
    cases[cases["dx_clinic"] != "other"].to_csv(tmp_path / "two.csv", index=False)
    data = load_clinic(
        clinic / "photos",
        tmp_path / "two.csv",
        column_map={"image": "filename", "label": "dx_clinic", "age": "patient_age", "group_id": "lesion"},
        label_map={"naevus": "nv", "melanoma": ["mel"]},
        sex_map={"M": "male", "F": "female"},
    )
    assert isinstance(data, ClinicData) and len(data) == 40 and data.labels == ["melanoma", "naevus"]
    options = dict(val_size=0.3, test_size=0.25, batch_size=8, checkpointing_steps="none", recalibrate=False)
    with pytest.raises(TypeError, match="unknown options"):
        finetune(checkpoint, data, tmp_path / "x", freeze_encoder=True)
    model, report = finetune(checkpoint, data, tmp_path / "kept", freeze_encoders=True, lr=0.0, epochs=1, **options)
    assert isinstance(model, sl.SkinDualNet) and model.config.id2label == {0: "melanoma", 1: "naevus"}
    assert report["kept_starting_model"] and report["best"]["epoch"] == -1
    epoch0 = report["history"][0]["validation"]
    for key in ("balanced_accuracy", "accuracy"):
        assert epoch0[key] == report["before"][key] == report["after"][key]
        assert report["after_test"][key] == report["before_test"][key]
    assert epoch0["macro_auc"] == pytest.approx(report["before"]["macro_auc"], abs=1e-6)
    assert report["after_test"]["ece"] == pytest.approx(report["before_test"]["ece"], abs=1e-5)
    assert json.loads((tmp_path / "kept" / "metrics.json").read_text())["kept_starting_model"] is True
    assert "No fine-tuning epoch beat the starting model" in (tmp_path / "kept" / "README.md").read_text()

    _, trained = finetune(checkpoint, data, tmp_path / "unfrozen", epochs=1, working_size=0, **options)
    assert trained["cached_features"] is None and trained["working_copies"] is None
    assert [record["epoch"] for record in trained["history"]] == [-1, 0]
    assert set(trained["after_test"]) == set(trained["before_test"]) - {"unmapped_classes"}


@pytest.mark.slow
def test_calibrate_refits_everything_on_a_clinic_folder_and_csv(checkpoint, clinic, tmp_path):
    """scripts/calibrate.py reads a clinic's folder + CSV (its labels the model's own classes) and, with
    --refit-trust, refits temperature, bias, referral point and gate on a grouped split of it, saved in the folder."""
    model_dir = tmp_path / "model"
    shutil.copytree(checkpoint, model_dir)
    cases = pd.read_csv(clinic / "cases.csv")
    cases = cases[cases["dx_clinic"] != "other"].assign(
        dx=lambda c: c["dx_clinic"].map({"naevus": "nv", "melanoma": "mel"})
    )
    cases.to_csv(tmp_path / "cases.csv", index=False)
    argv = [
        "--model", str(model_dir), "--dataset", "clinic", "--data-root", str(clinic / "photos"),
        "--clinic-csv", str(tmp_path / "cases.csv"), "--column-map", "image=filename", "label=dx", "age=patient_age",
        "group_id=lesion", "--tune-logit-bias", "--refit-trust", "--population", "clinic-x", "--batch-size", "8",
    ]  # fmt: skip
    run = subprocess.run(
        [sys.executable, str(SCRIPTS / "calibrate.py"), *argv],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    report = json.loads((model_dir / "metrics.json").read_text())["calibration"]
    assert report["population"] == "clinic-x" and report["validation_images"] == 20  # half of 40, lesion-grouped
    assert report["referral"]["malignant_images"] >= 5 and report["ood_gate"]["train_images"] == 20
    tuned = AutoModel.from_pretrained(model_dir)
    assert tuned.config.ood_threshold == pytest.approx(report["ood_gate"]["threshold"])
    assert tuned.config.referral_fitted_on.startswith("clinic-x validation split (20 images")
    assert tuned.config.temperature == pytest.approx(report["temperature_and_bias"]["temperature"])
    card = (model_dir / "README.md").read_text()
    assert card.count("## Recalibrated for clinic-x") == 1 and "gate statistics on 20 train images" in card

    # A label the model does not have is refused, naming it.
    cases.assign(dx="lentigo").to_csv(tmp_path / "bad.csv", index=False)
    argv[argv.index(str(tmp_path / "cases.csv"))] = str(tmp_path / "bad.csv")
    run = subprocess.run(
        [sys.executable, str(SCRIPTS / "calibrate.py"), *argv], capture_output=True, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600,
    )  # fmt: skip
    assert run.returncode != 0 and "lentigo" in run.stderr
