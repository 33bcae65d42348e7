"""SQuAD's nested JSON (`data[].paragraphs[].{context, qas[]}`) flattened to one row per question.

Rows match the hub's `rajpurkar/squad` columns (id, title, context, question, answers{text, answer_start}),
plus `article` (the article's index in the file, for splitting by article) and `is_impossible`
(SQuAD v2's flag; for v1 files, whether the question lists no answer).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_nested_squad(path: str | Path) -> list[dict] | None:
    """Flattened rows when the file is nested SQuAD JSON; None for any other JSON (or JSON Lines) file."""
    with open(path, encoding="utf-8") as handle:
        head = handle.read(1)
        while head.isspace():
            head = handle.read(1)
        if head != "{":
            return None
        handle.seek(0)
        try:
            content = json.load(handle)
        except json.JSONDecodeError:
            return None  # JSON Lines under a .json name
    if not is_nested_squad(content):
        return None
    return flatten_squad(content)


def is_nested_squad(content: Any) -> bool:
    articles = content.get("data") if isinstance(content, dict) else None
    return (
        isinstance(articles, list)
        and bool(articles)
        and isinstance(articles[0], dict)
        and isinstance(articles[0].get("paragraphs"), list)
    )


def flatten_squad(content: dict) -> list[dict]:
    rows = []
    for article_index, article in enumerate(content["data"]):
        for paragraph_index, paragraph in enumerate(article["paragraphs"]):
            for question_index, qa in enumerate(paragraph.get("qas", [])):
                answers = qa.get("answers") or []
                row = {
                    "id": str(qa.get("id", f"{article_index}-{paragraph_index}-{question_index}")),
                    "title": article.get("title", ""),
                    "article": article_index,
                    "context": paragraph["context"],
                    "question": qa["question"],
                    "answers": {
                        "text": [answer["text"] for answer in answers],
                        "answer_start": [int(answer["answer_start"]) for answer in answers],
                    },
                    "is_impossible": bool(qa.get("is_impossible", not answers)),
                }
                rows.append(row)
    return rows
