"""Dataset formats of causal SFT: each named format of the same conversation gives the same tokens and the same
response-only labels; raw text is learned on every token; detection and mixed files fail with the file, row and fix."""

from __future__ import annotations

import logging

import pytest
from transformers import AutoTokenizer

from peftkit.data.chat import IGNORE_INDEX
from peftkit.data.sources import load_splits
from peftkit.errors import UserError
from peftkit.evaluation.report import write_report
from peftkit.recipe.load import validate_recipe
from peftkit.tasks import causal_lm
from tests.conftest import write_jsonl

SYSTEM, PROMPT, INPUT, ANSWER = "be kind", "the movie", "was bad", "sad"
USER = f"{PROMPT}\n\n{INPUT}"  # alpaca joins instruction and input with a blank line
CHAT = [{"role": "user", "content": USER}, {"role": "assistant", "content": ANSWER}]
SAME_CONVERSATION = {
    "messages": {"messages": CHAT},
    "sharegpt": {"conversations": [{"from": "human", "value": USER}, {"from": "gpt", "value": ANSWER}]},
    "alpaca": {"instruction": PROMPT, "input": INPUT, "output": ANSWER},
    "prompt_completion": {"prompt": USER, "completion": ANSWER},
    "prompt_completion_messages": {"prompt": CHAT[:1], "completion": CHAT[1:]},
    "messages_with_text_parts": {"messages": [  # OpenAI's content parts, as the server accepts them
        {"role": "user", "content": [{"type": "text", "text": PROMPT}, {"type": "text", "text": f"\n\n{INPUT}"}]},
        {"role": "assistant", "content": [{"type": "text", "text": ANSWER}]}]},
}


def _recipe(model_dir, train_file, **task) -> object:
    return validate_recipe({
        "model": {"name": str(model_dir)},
        "task": {"type": "causal_lm", "chat_template": "plain", **task},
        "data": {"train": {"path": str(train_file)}, "max_length": 12},
        "training": {"eval_strategy": "no", "save_strategy": "no"},
    })


def _prepare(model_dir, tmp_path, rows, **task):
    recipe = _recipe(model_dir, write_jsonl(tmp_path / "train.jsonl", rows), **task)
    return causal_lm.prepare(recipe, load_splits(recipe.data), AutoTokenizer.from_pretrained(model_dir))


@pytest.mark.parametrize("name", sorted(SAME_CONVERSATION))
def test_every_chat_format_gives_the_same_tokens_and_response_mask(name, tiny_llama_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenized, info = _prepare(tiny_llama_dir, tmp_path, [SAME_CONVERSATION[name]] * 2)
    assert info["format"] == name.removesuffix("_messages").removesuffix("_with_text_parts")
    example = tokenized["train"][0]
    # plain template: "the movie\n\nwas bad\n" + "sad</s>\n"; only the answer and its end token are learned.
    assert tokenizer.decode(example["input_ids"]) == "the movie was bad sad </s>"
    kept = [token for token in example["labels"] if token != IGNORE_INDEX]
    assert tokenizer.decode(kept) == "sad </s>"
    assert example["labels"][: len(example["labels"]) - 2] == [IGNORE_INDEX] * (len(example["labels"]) - 2)


def test_raw_text_learns_every_token_and_long_texts_become_pieces(tiny_llama_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    words = "the food was good and the service was bad " * 3  # 27 words + end token = 28 tokens
    tokenized, info = _prepare(tiny_llama_dir, tmp_path, [{"text": words}, {"text": "it was fine"}])
    assert info["format"] == "text"
    pieces = tokenized["train"]
    assert [len(piece["input_ids"]) for piece in pieces] == [12, 12, 4, 4]  # max_length 12: cut, not dropped
    assert all(piece["labels"] == piece["input_ids"] for piece in pieces)
    assert tokenizer.decode(sum(pieces["input_ids"][:3], [])) == words.strip() + " </s>"


def test_responses_cut_by_max_length_are_counted(tiny_llama_dir, tmp_path, caplog):
    """A response cut by data.max_length trains without its end token; the run now says how many."""
    long = {**SAME_CONVERSATION["alpaca"], "output": " ".join([ANSWER] * 8)}
    with caplog.at_level(logging.WARNING, logger="peftkit"):
        tokenized, _ = _prepare(tiny_llama_dir, tmp_path, [SAME_CONVERSATION["alpaca"], long, SAME_CONVERSATION["alpaca"]])
    assert [len(row) for row in tokenized["train"]["input_ids"]] == [6, 12, 6]  # kept, cut at max_length 12
    assert "data.train: 1 of 3 rows have a response that runs past data.max_length=12 tokens and is cut" in caplog.text


def test_system_prompt_comes_first_in_every_format(tiny_llama_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenized, _ = _prepare(tiny_llama_dir, tmp_path, [SAME_CONVERSATION["sharegpt"]], system_prompt="the")
    assert tokenizer.decode(tokenized["train"][0]["input_ids"]).startswith("the the movie")


def test_unknown_columns_list_what_was_found_and_what_is_accepted(tiny_llama_dir, tmp_path):
    with pytest.raises(UserError, match=r"cannot tell the data format .* columns \['question', 'answer'\].*alpaca: instruction, output"):
        _prepare(tiny_llama_dir, tmp_path, [{"question": "a", "answer": "b"}])


def test_mixed_formats_in_one_file_name_the_row(tiny_llama_dir, tmp_path):
    rows = [SAME_CONVERSATION["sharegpt"], SAME_CONVERSATION["sharegpt"], SAME_CONVERSATION["alpaca"]]
    with pytest.raises(UserError, match=r"train.jsonl` mixes data formats: rows are `sharegpt` .* row 3 is `alpaca`.*own file"):
        _prepare(tiny_llama_dir, tmp_path, rows)


def test_unknown_sharegpt_role_is_named(tiny_llama_dir, tmp_path):
    row = {"conversations": [{"from": "narrator", "value": "x"}, {"from": "gpt", "value": "sad"}]}
    with pytest.raises(UserError, match=r"ShareGPT `from` value\(s\) \['narrator'\]"):
        _prepare(tiny_llama_dir, tmp_path, [row])


@pytest.mark.parametrize("turn, expected", [
    # A misspelt role trained as text under that name (chat templates render any role).
    ({"role": "usr", "content": "x"}, r"train.jsonl` row 2: column 'messages': role\(s\) \['usr'\] are not one of"),
    ({"role": "user", "content": None}, r"row 2: column 'messages': a user message has no content"),
    ({"role": "user", "content": 7}, r"column 'messages\[\].content' mixes value types: string at lines \[1, 2\] .*; number at lines \[2\] \(e.g. 7\)"),
    # String content next to a list of parts: `datasets` kept the field as JSON and turned the answer "0" into 0.
    ({"role": "user", "content": [{"type": "text", "text": "x"}]},
     r"column 'messages\[\].content' mixes value types: string at lines \[1, 2\] .*; list at lines \[2\]"),
])
def test_chat_rows_with_unknown_roles_or_content_are_refused_by_row(turn, expected, tiny_llama_dir, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "1 + 1 - 2 ="}, {"role": "assistant", "content": "0"}]},
            {"messages": [turn, {"role": "assistant", "content": "sad"}]}]
    with pytest.raises(UserError, match=expected):
        _prepare(tiny_llama_dir, tmp_path, rows)


def test_a_part_that_is_not_text_is_refused_by_row(tiny_llama_dir, tmp_path):
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "sad"}]}]}
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "text": "a.png"}]}, parts["messages"][1]]}
    with pytest.raises(UserError, match=r"row 2: .* text or a list of \{type: text, text\} parts, not \[\{'type': 'image_url'"):
        _prepare(tiny_llama_dir, tmp_path, [parts, image])


def test_second_tokenization_of_the_same_file_comes_from_the_datasets_cache(tiny_llama_dir, tmp_path):
    """A fresh tokenizer and recipe object over the same file and settings reuse the cached tokenized rows."""
    recipe = _recipe(tiny_llama_dir, write_jsonl(tmp_path / "train.jsonl", [SAME_CONVERSATION["alpaca"]] * 4))
    first, _ = causal_lm.prepare(recipe, load_splits(recipe.data), AutoTokenizer.from_pretrained(tiny_llama_dir))
    again = recipe.model_copy(deep=True)
    second, _ = causal_lm.prepare(again, load_splits(again.data), AutoTokenizer.from_pretrained(tiny_llama_dir))
    assert first["train"].cache_files and first["train"].cache_files == second["train"].cache_files
    longer = recipe.model_copy(update={"data": recipe.data.model_copy(update={"max_length": 13})})
    third, _ = causal_lm.prepare(longer, load_splits(longer.data), AutoTokenizer.from_pretrained(tiny_llama_dir))
    assert third["train"].cache_files != first["train"].cache_files  # other settings tokenize anew


def test_several_sources_mix_by_weight_reproducibly(tmp_path):
    from peftkit.data.sources import load_splits, split_origin

    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(4)])
    recipe = validate_recipe({
        "model": {"name": "unused"},
        "task": {"type": "causal_lm"},
        "data": {"train": [{"path": str(a), "weight": 0.5, "seed": 3}, {"path": str(b), "weight": 2}]},
        "training": {"eval_strategy": "no", "save_strategy": "no"},
    })
    mixed = load_splits(recipe.data)["train"]
    texts = mixed["text"]
    assert sum(t.startswith("a") for t in texts) == 5 and len(set(t for t in texts if t.startswith("a"))) == 5
    assert sorted(t for t in texts if t.startswith("b")) == sorted([f"b{i}" for i in range(4)] * 2)
    assert mixed.source_rows == [{"path": str(a), "weight": 0.5, "rows": 5}, {"path": str(b), "weight": 2.0, "rows": 8}]
    assert load_splits(recipe.data)["train"]["text"] == texts  # same seeds, same mixture
    assert split_origin(recipe.data, "train") == f"{a} + {b}"
    # The run's report says how many rows each source gave (run.py passes `source_rows` as summary["sources"]).
    summary = {"parameters": {"trainable": 1, "total": 2}, "examples": {"train": len(mixed)}, "sources": {"train": mixed.source_rows}}
    write_report(tmp_path, recipe, summary, {}, has_loss_plot=False)
    assert f"- train rows by source: `{a}` 5 (weight 0.5), `{b}` 8 (weight 2)\n" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("weight", [0, -1])
def test_a_weight_of_zero_or_below_is_refused_with_its_key(weight, tmp_path):
    with pytest.raises(UserError, match=r"data.train.1.weight.*greater than 0"):
        validate_recipe({"model": {"name": "m"}, "task": {"type": "causal_lm"},
                         "data": {"train": [{"path": "a.jsonl"}, {"path": "b.jsonl", "weight": weight}]},
                         "training": {"eval_strategy": "no", "save_strategy": "no"}})


def test_sources_of_one_split_need_the_same_columns(tmp_path):
    from peftkit.data.sources import load_splits

    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "x", "completion": "y"}])
    recipe = validate_recipe({"model": {"name": "m"}, "task": {"type": "causal_lm"},
                              "data": {"train": [{"path": str(a)}, {"path": str(b)}]},
                              "training": {"eval_strategy": "no", "save_strategy": "no"}})
    with pytest.raises(UserError, match=r"data.train\[1\]: .*b.jsonl` has columns \['prompt', 'completion'\] .* same columns"):
        load_splits(recipe.data)
