"""render_model_card: generic Jinja templates in model_cards/ (installed as hf_moe.card_templates), strict fields,
valid front matter."""

import pytest
from huggingface_hub import ModelCard, ModelCardData

import hf_moe.cards as cards
from hf_moe.cards import format_count, render_model_card
from hf_moe.modeling.configuration_moe import HF_MOE_VERSION, MIN_TRANSFORMERS, TESTED_TRANSFORMERS


@pytest.fixture
def templates(tmp_path, monkeypatch):
    monkeypatch.setattr(cards, "TEMPLATES", tmp_path)
    (tmp_path / "finetuned.md").write_text("---\n{{ card_data }}\n---\n\n# {{ model_name }}\n\nscore {{ score }}\n")
    return tmp_path


def test_any_template_renders_with_front_matter(templates):
    text = render_model_card(
        "finetuned", card_data=ModelCardData(base_model="org/base", tags=["moe"]), model_name="m", score=0.5
    )
    card = ModelCard(text)
    assert card.data.base_model == "org/base" and card.data.tags == ["moe"]
    assert "# m" in card.text and "score 0.5" in card.text


def test_missing_field_is_an_error(templates):
    with pytest.raises(
        ValueError, match="Model card template 'finetuned' needs a field that was not given: 'score' is undefined"
    ):
        render_model_card("finetuned", model_name="m")


def test_unknown_template_lists_the_available_ones(templates):
    with pytest.raises(FileNotFoundError, match=r"No model card template 'nope' in .*; available: \['finetuned'\]"):
        render_model_card("nope")


@pytest.mark.parametrize("name", ["upcycled", "finetuned"])
def test_the_shipped_templates_are_package_data(name):
    assert "{{ card_data }}" in cards.read_template(name)


@pytest.mark.parametrize("count, text", [(999, "999"), (43_550, "43.55K"), (7_241_732_096, "7.24B")])
def test_format_count(count, text):
    assert format_count(count) == text


@pytest.mark.parametrize("name", ["upcycled", "finetuned", "imported"])
def test_cards_of_checkpoints_with_our_code_name_its_version_and_transformers_range(name):
    text = cards.read_template(name)
    assert all(f"{{{{ {field} }}}}" in text for field in ("hf_moe_version", "min_transformers", "tested_transformers"))


def test_every_template_can_use_the_version_and_range_without_passing_them(templates):
    (templates / "versioned.md").write_text(
        "---\n{{ card_data }}\n---\n\nhf_moe {{ hf_moe_version }}, transformers {{ min_transformers }}"
        " to {{ tested_transformers }}\n"
    )
    text = render_model_card("versioned")
    assert f"hf_moe {HF_MOE_VERSION}, transformers {MIN_TRANSFORMERS} to {TESTED_TRANSFORMERS}" in text
