"""docs/configuration.md is generated from the config models, and every config field documents itself."""

from __future__ import annotations

import pytest

from mdkd.pipeline import config_reference
from mdkd.pipeline.distill.config import TrainConfig
from mdkd.pipeline.teacher_pass.config import CacheConfig


def test_committed_page_is_the_generated_one():
    expected = config_reference.render(config_reference.TEMPLATE.read_text(encoding="utf-8"))
    committed = config_reference.PAGE.read_text(encoding="utf-8")
    assert committed == expected, f"docs/configuration.md is out of date: run `{config_reference.REGENERATE}`"


def test_the_walk_reaches_every_nested_model():
    names = {model.__name__ for model in config_reference.walk_models()}
    assert names == {
        "CacheConfig",
        "CorpusSource",
        "TeacherSpec",
        "MaskingConfig",
        "TrainConfig",
        "StudentConfig",
        "InheritConfig",
        "VocabConfig",
        "AlphaConfig",
        "LossConfig",
        "TrainLoopConfig",
        "TrackersConfig",
    }


@pytest.mark.parametrize("root", [CacheConfig, TrainConfig], ids=lambda root: root.__name__)
def test_every_field_has_a_description(root):
    undocumented = [
        f"{model.__name__}.{name}"
        for model in config_reference.walk_models([root])
        for name, field in model.model_fields.items()
        if not (field.description or "").strip()
    ]
    assert not undocumented, f"give these fields Field(..., description=...): {', '.join(undocumented)}"
