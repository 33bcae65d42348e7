"""Translation and summarization on a tiny random T5: data checks, generation settings, metrics and reports."""

from __future__ import annotations

import json
import logging

import pytest
import sacrebleu
from datasets import Dataset
from transformers import AutoTokenizer

from tests.conftest import SHARED_DATA, classification_recipe, number_rows, write_jsonl
from peftkit.errors import UserError
from peftkit.recipe.load import validate_recipe
from peftkit.tasks import seq2seq


def _recipe(model_dir, files, run_dir, task, **sections):
    recipe = classification_recipe(
        model_dir, files, run_dir,
        training={"max_steps": 3, "eval_strategy": "no", "save_strategy": "no", "batch_size": 8},
        generation={"max_new_tokens": 3, "num_beams": 2, "length_penalty": 1.0},
        **sections,
    )
    recipe["task"] = task
    return validate_recipe(recipe)


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_translation_run_scores_generations_with_sacrebleu(tiny_t5_dir, tmp_path):
    from peftkit.saved_run import predict_file
    from peftkit.training.run import train

    files = {
        "train": write_jsonl(tmp_path / "train.jsonl", number_rows(32, seed=1)),
        "test": write_jsonl(tmp_path / "test.jsonl", number_rows(12, seed=2)),
    }
    run_dir = train(_recipe(tiny_t5_dir, files, tmp_path / "run", {"type": "translation"}))
    metrics = json.loads((run_dir / "metrics.json").read_text())["test"]
    records = _records(run_dir)
    assert len(records) == metrics["examples"] == 12
    predictions = [r["predicted"] for r in records]
    assert any(predictions) and all(len(p.split()) <= 3 for p in predictions)  # generation.max_new_tokens
    references = [[r["references"][0] for r in records]]
    assert metrics["bleu"] == pytest.approx(sacrebleu.corpus_bleu(predictions, references).score)
    assert metrics["chrf"] == pytest.approx(sacrebleu.corpus_chrf(predictions, references).score)
    report = (run_dir / "report.md").read_text()
    assert "| BLEU | chrF | examples |" in report and "chrf by source length" in report
    assert "Lowest-scoring examples (chrf)" in report

    # predict on sources only: predictions without references or scores, same generations as the test split
    inputs = write_jsonl(tmp_path / "inputs.jsonl", [{"source": row["source"]} for row in number_rows(12, seed=2)])
    assert predict_file(run_dir, str(inputs), tmp_path / "out.jsonl") == 12
    predicted = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [p["predicted"] for p in predicted] == predictions
    assert all(set(p) == {"source", "predicted"} for p in predicted)

    # deployment decodes as the report measured: the run's beams and length, through the same decode path
    from peftkit.deploy.attach import AttachedModel

    attached = AttachedModel(str(tiny_t5_dir), {"run": str(run_dir)})
    assert attached.generation("run").num_beams == 2
    rows = [{"text": row["source"]} for row in number_rows(12, seed=2)]
    assert [answer["text"].strip() for answer in attached.predict(rows, "run")] == predictions
    limits = [1, 3, 2] * 4  # beam search per row limit: each row as if alone
    mixed = attached.predict(rows, "run", max_new_tokens=limits)
    assert mixed == [attached.predict([row], "run", max_new_tokens=limit)[0] for row, limit in zip(rows, limits)]


@pytest.mark.slow
def test_summarization_run_reports_rouge(tiny_t5_dir, tmp_path):
    from rouge_score import rouge_scorer

    from peftkit.training.run import train

    rows = [{"document": r["source"].split(), "summary": [r["target"], r["source"]]} for r in number_rows(32, seed=3)]
    files = {
        "train": write_jsonl(tmp_path / "train.jsonl", rows[:24]),
        "validation": write_jsonl(tmp_path / "validation.jsonl", rows[24:]),
    }
    run_dir = train(_recipe(tiny_t5_dir, files, tmp_path / "run", {"type": "summarization"}))
    metrics = json.loads((run_dir / "metrics.json").read_text())["validation"]
    records = _records(run_dir)
    assert records[0]["source"] == " ".join(rows[24]["document"])  # a list of sentences reads as one document
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2"], use_stemmer=True)
    for name in ("rouge1", "rouge2"):
        best = [max(scorer.score(ref, r["predicted"])[name].fmeasure for ref in r["references"]) for r in records]
        assert metrics[name] == pytest.approx(100 * sum(best) / len(best), abs=1e-3)
    report = (run_dir / "report.md").read_text()
    assert "| ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-Lsum |" in report and "Lowest-scoring examples (rougeL)" in report


def test_empty_references_are_dropped_from_training_and_unscored_in_evaluation(tiny_t5_dir, tmp_path, caplog):
    rows = number_rows(6, seed=4)
    rows[1]["target"] = "  "
    rows[2]["source"] = ""
    recipe = _recipe(tiny_t5_dir, {"train": tmp_path / "t.jsonl"}, tmp_path / "run", {"type": "translation"})
    tokenizer = AutoTokenizer.from_pretrained(tiny_t5_dir)
    with caplog.at_level(logging.WARNING, logger="peftkit"):
        tokenized, _ = seq2seq.prepare(recipe, {"train": Dataset.from_list(rows), "test": Dataset.from_list(rows)}, tokenizer)
    assert len(tokenized["train"]) == 4 and len(tokenized["test"]) == 6
    assert "2 of 6 rows" in caplog.text and "dropped" in caplog.text and "not scored" in caplog.text
    rows = [{"source": "good", "target": ""}]
    with pytest.raises(UserError, match="every row"):
        seq2seq.prepare(recipe, {"train": Dataset.from_list(rows)}, tokenizer)


def test_missing_target_column_names_the_key(tiny_t5_dir, tmp_path):
    recipe = _recipe(tiny_t5_dir, {"train": tmp_path / "t.jsonl"}, tmp_path / "run", {"type": "translation", "target_column": "fr"})
    with pytest.raises(UserError, match="no column 'fr'.*task.source_column/task.target_column"):
        seq2seq.prepare(recipe, {"train": Dataset.from_list(number_rows(3, 1))}, AutoTokenizer.from_pretrained(tiny_t5_dir))


def test_source_prefix_and_target_truncation(tiny_t5_dir, tmp_path, caplog):
    task = {"type": "translation", "source_prefix": "translate good to bad : ", "max_target_length": 3}
    recipe = _recipe(tiny_t5_dir, {"train": tmp_path / "t.jsonl"}, tmp_path / "run", task, data={"max_length": 8})
    tokenizer = AutoTokenizer.from_pretrained(tiny_t5_dir)
    rows = [{"source": "fine", "target": "1 2 3 4 5"}, {"source": "fine", "target": "1 2"},  # 2 words + </s> fill 3
            {"source": "fine fine", "target": "1"}, {"source": "fine fine fine", "target": "1"}]  # 6 prefix words: 8, 9
    with caplog.at_level(logging.WARNING, logger="peftkit"):
        tokenized, _ = seq2seq.prepare(recipe, {"train": Dataset.from_list(rows)}, tokenizer)
    assert tokenizer.decode(tokenized["train"][0]["input_ids"], skip_special_tokens=True) == "good bad fine"
    assert [len(row) for row in tokenized["train"]["labels"]] == [3, 3, 2, 2]
    assert [len(row) for row in tokenized["train"]["input_ids"]] == [7, 7, 8, 8]
    # a cut reference still ends with </s>: the model would learn to stop there, so the count is said
    assert "1 of 4 references are longer than task.max_target_length=3 tokens and are cut" in caplog.text
    assert "1 of 4 sources are longer than data.max_length=8 tokens and are cut" in caplog.text


@pytest.mark.skipif(not (SHARED_DATA / "summarization" / "scitldr").is_dir(), reason="shared data absent")
def test_scitldr_lists_become_documents_and_reference_sets(tiny_t5_dir, tmp_path):
    from peftkit.data.sources import load_splits

    recipe = _recipe(
        tiny_t5_dir, {"train": SHARED_DATA / "summarization" / "scitldr" / "dev.jsonl"}, tmp_path / "run",
        {"type": "summarization", "source_column": "source", "target_column": "target"},
    )
    splits = load_splits(recipe.data)
    tokenized, _ = seq2seq.prepare(recipe, splits, AutoTokenizer.from_pretrained(tiny_t5_dir))
    assert len(tokenized["train"]) == len(splits["train"]) > 600  # no SciTLDR row has an empty side
    assert max(len(seq2seq.references(v)) for v in splits["train"]["target"]) > 1


def _nllb_like(directory):
    """A tiny M2M100 (NLLB's architecture) saved with NLLB's tokenizer (its built-in vocabulary: language codes and
    special tokens; words are <unk>, which is enough to see where the codes go)."""
    import torch
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, NllbTokenizer

    tokenizer = NllbTokenizer()
    tokenizer.save_pretrained(directory)
    config = AutoConfig.for_model(
        "m2m_100", vocab_size=len(tokenizer), d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    AutoModelForSeq2SeqLM.from_config(config).save_pretrained(directory)
    return directory, tokenizer


def test_multilingual_tokenizers_need_known_language_codes_and_others_refuse_them(tiny_t5_dir, tmp_path):
    from transformers import MBart50Tokenizer, MBartTokenizer

    from peftkit.tasks import languages

    model_dir, tokenizer = _nllb_like(tmp_path / "nllb")
    rows = {"train": Dataset.from_list(number_rows(3, 1))}

    def prepare(model, tokenizer, **codes):
        recipe = _recipe(model, {"train": tmp_path / "t.jsonl"}, tmp_path / "run", {"type": "translation", **codes})
        return seq2seq.prepare(recipe, rows, tokenizer)

    with pytest.raises(UserError, match=r"task.source_lang and task.target_lang: .* set both, e.g. eng_Latn"):
        prepare(model_dir, tokenizer)  # silently tagged every target as English before
    with pytest.raises(UserError, match=r"task.target_lang: 'fr' is not a language code of this tokenizer"):
        prepare(model_dir, tokenizer, source_lang="eng_Latn", target_lang="fr")  # would have become <unk>
    with pytest.raises(UserError, match=r"the tokenizer of .* has no language codes"):
        prepare(tiny_t5_dir, AutoTokenizer.from_pretrained(tiny_t5_dir), source_lang="en", target_lang="fr")

    tokenized, info = prepare(model_dir, tokenizer, source_lang="deu_Latn", target_lang="fra_Latn")
    assert info["source_lang"] == "deu_Latn" and info["target_lang"] == "fra_Latn"
    ids = tokenizer.convert_tokens_to_ids
    assert {row[0] for row in tokenized["train"]["input_ids"]} == {ids("deu_Latn")}
    assert {row[0] for row in tokenized["train"]["labels"]} == {ids("fra_Latn")}
    # where the target's code goes decides how generation starts: first (NLLB, mBART-50) or as the decoder start (mBART)
    assert languages.decoder_start(tokenizer, info["target_lang"]) == {"forced_bos_token_id": ids("fra_Latn")}
    mbart50, mbart = MBart50Tokenizer(), MBartTokenizer()
    assert languages.decoder_start(mbart50, "fr_XX") == {"forced_bos_token_id": mbart50.convert_tokens_to_ids("fr_XX")}
    assert languages.decoder_start(mbart, "fr_XX") == {"decoder_start_token_id": mbart.convert_tokens_to_ids("fr_XX")}


@pytest.mark.slow
def test_a_multilingual_run_generates_in_its_target_language_in_training_and_deployment(tmp_path, monkeypatch):
    from transformers.generation.utils import GenerationMixin

    from peftkit.deploy.attach import AttachedModel
    from peftkit.training.run import train

    model_dir, tokenizer = _nllb_like(tmp_path / "nllb")
    calls = []
    original = GenerationMixin.generate

    def spy(self, *args, **kwargs):
        calls.append((kwargs.get("forced_bos_token_id"), kwargs["input_ids"][:, 0].tolist()))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", spy)
    files = {"train": write_jsonl(tmp_path / "train.jsonl", number_rows(8, seed=1)),
             "test": write_jsonl(tmp_path / "test.jsonl", number_rows(4, seed=2))}
    task = {"type": "translation", "source_lang": "deu_Latn", "target_lang": "fra_Latn"}
    run_dir = train(_recipe(model_dir, files, tmp_path / "run", task))
    ids = tokenizer.convert_tokens_to_ids
    assert calls and all(forced == ids("fra_Latn") and set(firsts) == {ids("deu_Latn")} for forced, firsts in calls)

    calls.clear()
    tokenizer.src_lang = "eng_Latn"  # deployment must not depend on the state a tokenizer was left in
    attached = AttachedModel(str(model_dir), {"run": str(run_dir)})
    attached.predict([{"text": row["source"]} for row in number_rows(3, seed=2)], "run")
    assert calls == [(ids("fra_Latn"), [ids("deu_Latn")] * 3)]


def _tiny_marian(directory):
    """A tiny MarianMT model with a real MarianTokenizer: sentencepiece models trained here on the test words."""
    import json
    import shutil

    import sentencepiece
    import torch
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    directory.mkdir()
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(f"{row['source']}\n{row['target']}" for row in number_rows(200, seed=9)))
    sentencepiece.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(directory / "sp"), vocab_size=40,
                                             hard_vocab_limit=False, minloglevel=2)
    pieces = sentencepiece.SentencePieceProcessor(model_file=str(directory / "sp.model"))
    vocabulary = {"</s>": 0, "<unk>": 1, "<pad>": 2}
    for i in range(pieces.get_piece_size()):
        vocabulary.setdefault(pieces.id_to_piece(i), len(vocabulary))
    (directory / "vocab.json").write_text(json.dumps(vocabulary))
    for name in ("source.spm", "target.spm"):
        shutil.copy(directory / "sp.model", directory / name)
    tokenizer = MarianTokenizer(*(str(directory / name) for name in ("source.spm", "target.spm", "vocab.json")))
    model_dir = directory / "model"
    tokenizer.save_pretrained(model_dir)
    config = MarianConfig(vocab_size=len(vocabulary), d_model=32, encoder_layers=1, decoder_layers=1,
                          encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                          max_position_embeddings=64, pad_token_id=2, eos_token_id=0, decoder_start_token_id=2)
    torch.manual_seed(0)
    MarianMTModel(config).save_pretrained(model_dir)
    return model_dir


@pytest.mark.slow
def test_marian_with_its_sentencepiece_tokenizer_trains_evaluates_and_deploys(tmp_path):
    """opus-mt models have only a slow sentencepiece tokenizer: sentencepiece is a dependency (a fresh install
    refused them: "MarianTokenizer requires the SentencePiece library")."""
    from peftkit.deploy.attach import AttachedModel
    from peftkit.saved_run import evaluate_run
    from peftkit.training.run import train

    model_dir = _tiny_marian(tmp_path / "marian")
    assert type(AutoTokenizer.from_pretrained(model_dir)).__name__ == "MarianTokenizer"
    files = {"train": write_jsonl(tmp_path / "train.jsonl", number_rows(16, seed=1)),
             "test": write_jsonl(tmp_path / "test.jsonl", number_rows(4, seed=2))}
    run_dir = train(_recipe(model_dir, files, tmp_path / "run", {"type": "translation"}))
    trained = json.loads((run_dir / "metrics.json").read_text())["test"]
    assert evaluate_run(run_dir)[1]["chrf"] == pytest.approx(trained["chrf"])
    attached = AttachedModel(str(model_dir), {"run": str(run_dir)})
    predicted = [answer["text"].strip() for answer in attached.predict([{"text": r["source"]} for r in number_rows(4, seed=2)], "run")]
    assert predicted == [record["predicted"] for record in _records(run_dir)]


def test_a_wmt_style_pairs_file_trains_and_predicts_by_language(tiny_t5_dir, tmp_path):
    """`translation: {en: ..., nb: ...}` rows (the WMT / OPUS form) with the languages as source and target columns."""
    from peftkit.saved_run import predict_file
    from peftkit.training.run import train

    def pairs(rows):
        return [{"translation": {"en": row["source"], "nb": row["target"]}} for row in rows]

    files = {"train": write_jsonl(tmp_path / "train.jsonl", pairs(number_rows(16, seed=1))),
             "test": write_jsonl(tmp_path / "test.jsonl", pairs(number_rows(4, seed=2)))}
    task = {"type": "translation", "source_column": "en", "target_column": "nb"}
    run_dir = train(_recipe(tiny_t5_dir, files, tmp_path / "run", task))
    records = _records(run_dir)
    assert [r["source"] for r in records] == [row["source"] for row in number_rows(4, seed=2)]
    assert [r["references"] for r in records] == [[row["target"]] for row in number_rows(4, seed=2)]
    assert predict_file(run_dir, str(files["test"]), tmp_path / "out.jsonl") == 4
