"""scripts/finetune.py: fine-tuning a pretrained checkpoint on a new clinic's data, end to end on real HAM10000 images
relabelled as a 3-class clinic task, with its own CSV columns and metadata spellings."""

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
import _arguments  # noqa: E402
import _finetuning as script  # noqa: E402
import finetune  # noqa: E402
import train_classifier  # noqa: E402

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
        "--output-dir", str(output), "--epochs", "2", "--batch-size", "8", "--val-size", "0.3", "--freeze-encoders",
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
    for stage in ("before", "after"):
        assert set(report[stage]["per_class_auc"]) == {"melanoma", "naevus", "other"}
        assert 0.0 <= report[stage]["balanced_accuracy"] <= 1.0 and report[stage]["num_samples"] >= 15
    assert report["before"]["unmapped_classes"] == []
    assert len(report["history"]) == 2

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
    assert model.config.site_synonyms["left forearm"] == "upper extremity"
    assert len(model.config.class_weights) == 3
    base, tuned = load_file(str(checkpoint / "model.safetensors")), model.state_dict()
    frozen = [k for k in base if k.startswith(("image_encoder.", "lesion_encoder.", "segmenter."))]
    assert frozen and all(torch.equal(base[k], tuned[k]) for k in frozen)
    assert not torch.equal(
        base["fusion.lesion_to_image.0.mlp.0.weight"], tuned["fusion.lesion_to_image.0.mlp.0.weight"]
    )
    assert (output / "preprocessor_config.json").is_file()
    splits = json.loads((output / "splits.json").read_text())
    assert len(splits["train"]) + len(splits["validation"]) == 60
    assert not set(splits["train"]) & set(splits["validation"])

    # The card: fine-tuned from the checkpoint, trained on HAM10000 before, so non-commercial.
    card = ModelCard.load(output / "README.md")
    assert card.data.license == "cc-by-nc-4.0" and card.data.base_model == str(checkpoint)
    assert card.data.datasets == ["HAM10000", "clinic"]
    assert "Evaluated on dataset: clinic; split: validation" in card.text
    assert "Before fine-tuning (the base checkpoint, its classes mapped onto these)" in card.text
    assert f"| balanced_accuracy | {report['after']['balanced_accuracy']:.4f} |" in card.text


def test_new_head_starts_from_mapped_rows(checkpoint):
    base = sl.SkinDualNet.from_pretrained(checkpoint)
    mapping = script.resolve_label_map(["melanoma", "naevus", "other"], HAM_LABELS, ["naevus=nv", "melanoma=mel"])
    model = script.build_model(str(checkpoint), base, ["melanoma", "naevus", "other"], mapping, [1.0, 1.0, 2.0])
    old, new = base.classifier[-1], model.classifier[-1]
    assert new.weight.shape == (3, old.weight.shape[1])
    assert torch.equal(new.weight[0], old.weight[HAM_LABELS.index("mel")])
    assert torch.equal(new.weight[1], old.weight[HAM_LABELS.index("nv")])
    assert not any(torch.equal(new.weight[2], row) for row in old.weight)
    assert torch.equal(model.classifier[1].weight, base.classifier[1].weight)  # the rest is the checkpoint's
    # The same classes keep the whole checkpoint.
    same = script.build_model(
        str(checkpoint), base, HAM_LABELS, script.resolve_label_map(HAM_LABELS, HAM_LABELS, []), None
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
        (["melanoma=melanoma_in_situ"], "not classes of the checkpoint"),
        (["lentigo=bkl"], "clinic class 'lentigo'"),
        (["melanoma=mel", "other=mel,bcc"], "several clinic classes"),
    ],
)
def test_label_map_errors(pairs, message):
    with pytest.raises(ValueError, match=message):
        script.resolve_label_map(["melanoma", "naevus", "other"], HAM_LABELS, pairs)


def test_metadata_synonyms_must_target_the_vocabulary():
    config = sl.SkinDualNetConfig()
    added = script.extend_synonyms(config, ["Rücken=posterior torso"], ["X=unknown"])
    assert config.site_synonyms["Rücken"] == "posterior torso" and added["sex"] == {"X": "unknown"}
    with pytest.raises(ValueError, match="not in the model's site vocabulary"):
        script.extend_synonyms(config, ["nail=nail unit"], [])
