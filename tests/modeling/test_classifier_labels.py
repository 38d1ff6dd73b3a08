"""A classifier's labels live on both configs: the nested decoder builds the head, pipelines read the outer one."""

import pytest
import torch
from backbones import VOCAB, dense_config
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedTokenizerFast, pipeline

import hf_moe

LABELS = {2: ["negative", "positive"], 3: ["negative", "neutral", "positive"]}
ARCHITECTURES = {"switch": hf_moe.SwitchMoeConfig, "expert_choice": hf_moe.ExpertChoiceMoeConfig}


def tokenizer():
    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2} | {f"w{i}": i for i in range(3, VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<unk>")


def classifier_with_labels_on_the_nested_config(routing, names):
    # What upcycling a dense classifier gives: the labels come with the dense config.
    id2label = dict(enumerate(names))
    text_config = dense_config("llama", id2label=id2label, label2id={n: i for i, n in id2label.items()})
    config = ARCHITECTURES[routing](text_config=text_config, num_experts=4, moe_layers=[1, 3])
    return AutoModelForSequenceClassification.from_config(config).eval()


@pytest.mark.parametrize("routing", list(ARCHITECTURES))
@pytest.mark.parametrize("num_labels", [2, 3])
def test_text_classification_pipeline_shows_the_label_names(routing, num_labels, tmp_path):
    names = LABELS[num_labels]
    model = classifier_with_labels_on_the_nested_config(routing, names)
    assert model.config.num_labels == num_labels and model.config.id2label == dict(enumerate(names))
    assert model.config.label2id == {n: i for i, n in enumerate(names)}
    model.save_pretrained(tmp_path)
    tokenizer().save_pretrained(tmp_path)
    saved = AutoConfig.from_pretrained(tmp_path)
    assert saved.id2label == dict(enumerate(names)) == saved.text_config.id2label

    classify = pipeline("text-classification", model=str(tmp_path), top_k=None)
    texts = ["w5 w9 w17 w30", "w40 w41 w7", "w80 w3 w3 w60 w12"]
    results = classify(texts)
    for text, scores in zip(texts, results, strict=True):
        assert sorted(s["label"] for s in scores) == sorted(names)
        with torch.no_grad():
            logits = model(**tokenizer()(text, return_tensors="pt")).logits[0]
        assert max(scores, key=lambda s: s["score"])["label"] == names[int(logits.argmax())]


def test_labels_given_to_the_outer_config_reach_the_head():
    id2label = {0: "no", 1: "maybe", 2: "yes"}
    config = hf_moe.SwitchMoeConfig(text_config=dense_config("llama"), num_experts=4, id2label=id2label)
    assert config.text_config.id2label == id2label
    model = AutoModelForSequenceClassification.from_config(config)
    assert model.backbone.score.out_features == 3
    config.num_labels = 5  # the property sets both label maps; both are mirrored
    assert config.text_config.num_labels == 5 and config.text_config.label2id == config.label2id


def test_from_pretrained_num_labels_reaches_the_nested_head(tmp_path):
    # Fine-tuning a classifier from a saved MoE checkpoint: num_labels is given to the outer config.
    classifier_with_labels_on_the_nested_config("switch", LABELS[2]).save_pretrained(tmp_path)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=3, ignore_mismatched_sizes=True)
    assert model.config.num_labels == model.config.text_config.num_labels == 3
    assert model.backbone.score.out_features == 3
