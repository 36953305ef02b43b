"""Training pieces that need no model: data formats, replay mix, batching, schedule, scoring,
presets, the demo generator and the capture writer."""

from __future__ import annotations

import json
import random
import re

import pytest

from loraplex.server.capture import CaptureWriter
from loraplex.server.config import TrainConfig
from loraplex.server.training import data, demo, presets
from loraplex.server.training.evaluate import parse_object, score
from loraplex.server.training.trainer import learning_rate_at


class CharTokenizer:
    """One token per character; enough to check label masking and truncation."""

    eos_token = "$"

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        text = "".join(f"<{m['role']}>{m['content']}</>" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_both_formats_load_and_only_completion_tokens_are_labelled(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "2+2=", "completion": "4"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
    ])
    text, chat = data.load_examples(path, CharTokenizer())
    assert (text.prompt, text.completion, text.reference) == ("2+2=", "4$", "4")
    assert chat.prompt == "<user>hi</><assistant>" and chat.completion == "yo</>" and chat.reference == "yo"
    features = data.tokenize(chat, CharTokenizer(), max_length=64)
    labelled = [t for t, label in zip(features.input_ids, features.labels) if label != data.IGNORE_INDEX]
    assert "".join(map(chr, labelled)) == "yo</>"
    assert features.labels[:len(chat.prompt)] == [data.IGNORE_INDEX] * len(chat.prompt)


def test_long_pairs_lose_the_start_of_the_prompt_not_the_completion():
    example = data.Example(prompt="abcdefghij", completion="XYZ", reference="XYZ")
    features = data.tokenize(example, CharTokenizer(), max_length=6)
    assert "".join(map(chr, features.input_ids)) == "hijXYZ"
    assert features.labels[-3:] == [ord(c) for c in "XYZ"]


@pytest.mark.parametrize("line, message", [
    ("not json", "not JSON"),
    ('["a list"]', "JSON object"),
    ('{"prompt": "only"}', "need either"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "at least two"),
    ('{"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}', "assistant"),
])
def test_bad_lines_are_reported_with_their_line_number(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "completion": "ok"}, line])
    with pytest.raises(data.DataError, match=rf"bad.jsonl:2: .*{message}"):
        data.read_records(path)


def test_empty_file_is_an_error(tmp_path):
    with pytest.raises(data.DataError, match="no examples"):
        data.read_records(write_jsonl(tmp_path / "e.jsonl", []))


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5])
def test_replay_makes_up_the_requested_share(ratio):
    train = [data.Example(f"t{i}", "c", "c") for i in range(90)]
    replay = [data.Example(f"r{i}", "c", "c") for i in range(7)]
    mixed = data.mix_replay(train, replay, ratio, seed=0)
    share = sum(e.prompt.startswith("r") for e in mixed) / len(mixed)
    assert abs(share - ratio) < 0.01
    assert [e for e in mixed if e.prompt.startswith("t")] == train


def test_batches_cover_every_example_once_and_group_similar_lengths():
    features = [data.Features([1] * n, [1] * n) for n in random.Random(0).choices(range(1, 200), k=100)]
    grouped = data.batches(features, 8, random.Random(1))
    assert sorted(id(f) for b in grouped for f in b) == sorted(id(f) for f in features)
    padding = sum(max(len(f.input_ids) for f in b) * len(b) - sum(len(f.input_ids) for f in b) for b in grouped)
    naive = data.batches(features, 8, rng=None)
    naive_padding = sum(max(len(f.input_ids) for f in b) * len(b) - sum(len(f.input_ids) for f in b) for b in naive)
    assert padding < naive_padding / 2


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    rates = [learning_rate_at(s, 100, 1e-3, 0.1) for s in range(100)]
    assert rates[0] == pytest.approx(1e-4) and max(rates) == pytest.approx(1e-3)
    assert rates.index(max(rates)) == 9
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))
    assert rates[-1] == pytest.approx(1e-4, rel=0.01)


def test_json_scoring_counts_fields_and_tolerates_number_formatting():
    refs = ['{"payoff_amount": 10.5, "due_date": "2026-01-02"}'] * 3
    preds = ['{"payoff_amount": 10.50, "due_date": "2026-01-02"}',
             'Sure! {"payoff_amount": "10.5", "due_date": "2026-01-03"}',
             "I cannot help with that."]
    exact, fields, parsed = score(refs, preds)
    assert exact == pytest.approx(1 / 3) and fields == pytest.approx(3 / 6) and parsed == pytest.approx(2 / 3)
    assert score(["a", "b"], ["a", "c"]) == (0.5, None, None)
    assert parse_object('x {"a": 1} y') == {"a": 1}


def test_demo_answers_are_in_the_statement_and_streams_are_reproducible(tmp_path):
    rng = random.Random(3)
    for _ in range(50):
        text, answer = demo.make_statement(rng)
        amounts = {float(a.replace(",", "")) for a in re.findall(r"(?:\$|USD )([\d,]+\.\d\d)", text)}
        assert answer["payoff_amount"] in amounts and len(amounts) >= 4  # the answer hides among distractors
        assert re.fullmatch(r"\d{4}-\d\d-\d\d", answer["due_date"])
    train_a, eval_a = demo.write_demo_data(tmp_path / "a", 20, 5)
    train_b, _ = demo.write_demo_data(tmp_path / "b", 20, 5)
    assert train_a.read_text() == train_b.read_text()
    assert not set(train_a.read_text().splitlines()) & set(eval_a.read_text().splitlines())
    assert len(data.read_records(train_a)) == 20


def test_presets_fill_train_config_and_reject_unknown_keys(tmp_path):
    assert {"default", "demo"} <= set(presets.preset_names())
    for name in presets.preset_names():
        TrainConfig(train_path=tmp_path / "t", out_dir=tmp_path / "o", **presets.load_preset(name))
    bad = tmp_path / "bad.json"
    bad.write_text('{"rank": 4, "learning_rat": 1}')
    with pytest.raises(ValueError, match="learning_rat"):
        presets.load_preset(str(bad))
    with pytest.raises(ValueError, match="no preset"):
        presets.load_preset("nope")


def test_capture_writes_training_format_per_model(tmp_path):
    writer = CaptureWriter(tmp_path / "cap")
    writer.record("team/extractor", {"messages": [{"role": "user", "content": "q"}]}, "a")
    writer.record("team/extractor", {"prompt": "p"}, "c")
    path = writer.path_for("team/extractor")
    assert path.parent == tmp_path / "cap" and "/" not in path.name
    records = data.read_records(path)
    assert records[0]["messages"][-1] == {"role": "assistant", "content": "a"}
    assert records[1] == {"prompt": "p", "completion": "c"}


def test_capture_gives_each_model_its_own_file_and_never_follows_a_symlink(tmp_path):
    from loraplex.server.capture import capture_file_name

    names = ["x", "x.", "x_", "x-", ".x", "x%2E", "team/x", "team%2Fx", "é", "\ud800"]
    assert len({capture_file_name(n) for n in names}) == len(names)
    assert all("/" not in capture_file_name(n) and not capture_file_name(n).startswith(".") for n in names)
    writer = CaptureWriter(tmp_path / "cap")
    secret = tmp_path / "elsewhere.jsonl"
    secret.write_text("")
    writer.path_for("victim").symlink_to(secret)
    writer.record("victim", {"prompt": "p"}, "c")
    assert secret.read_text() == ""  # not written through the link
    writer.record("x", {"prompt": "p"}, "c")
    writer.record("x.", {"prompt": "q"}, "d")
    assert data.read_records(writer.path_for("x")) == [{"prompt": "p", "completion": "c"}]
    assert data.read_records(writer.path_for("x.")) == [{"prompt": "q", "completion": "d"}]


@pytest.mark.parametrize("schema_text, words", [
    ("{not json", "Expecting"),
    ('{"title": "\\ud800"}', "lone surrogate"),
    ('{"enum": ["' + "x" * 40_000 + '"]}', "exceeds"),
])
def test_a_bad_eval_schema_is_refused_before_training(tmp_path, capsys, schema_text, words):
    from loraplex.server.cli import main

    schema = tmp_path / "schema.json"
    schema.write_text(schema_text)
    data_path = tmp_path / "train.jsonl"
    data_path.write_text('{"prompt": "a", "completion": "b"}\n')
    assert main(["train", "--data", str(data_path), "--out", str(tmp_path / "out"), "--eval-schema", str(schema)]) == 2
    assert words in capsys.readouterr().err and not (tmp_path / "out").exists()
