"""Language codes of multilingual encoder-decoders (NLLB, M2M100, mBART, mBART-50).

Their tokenizers mark each sequence with a language token (`eng_Latn`, `en_XX`, `__en__`) and the model was
pre-trained to read the source's code and to write the target's code first. Left at the tokenizer's defaults,
every target is tagged as English and generation picks its own language: a fine-tune that looks fine on the loss
and translates into the wrong language. So these tokenizers need `task.source_lang` / `task.target_lang`, other
tokenizers refuse them, and a code the tokenizer does not know (it would silently become `<unk>`) is refused.
"""

from __future__ import annotations

from peftkit.errors import UserError


def is_multilingual(tokenizer) -> bool:
    """Tokenizers that put a language token on every sequence (NLLB, M2M100, mBART, PLBart, ...) switch it with
    `set_src_lang_special_tokens`; FSMT's `src_lang` only picks its word splitter and adds no token."""
    return hasattr(tokenizer, "set_src_lang_special_tokens")


def _language_token(tokenizer, code: str, target: bool) -> tuple[int, bool]:
    """(id of the code's token, whether it comes first) in a sequence encoded with `code` as its language."""
    setattr(tokenizer, "tgt_lang" if target else "src_lang", code)
    ids = tokenizer(**({"text_target": "a"} if target else {"text": "a"}))["input_ids"]
    plain = {tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
    codes = [i for i, token in enumerate(ids) if token in tokenizer.all_special_ids and token not in plain]
    if len(codes) != 1:  # an unknown code became <unk>
        raise UserError(
            f"task.{'target_lang' if target else 'source_lang'}: {code!r} is not a language code of this tokenizer "
            f"({type(tokenizer).__name__}); use one of its codes, e.g. {', '.join(_examples(tokenizer))}"
        )
    return ids[codes[0]], codes[0] == 0


def _examples(tokenizer) -> list[str]:
    """The tokenizer's default code, then its first language tokens (M2M100's `__en__` is the code `en`)."""
    plain = {tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token, tokenizer.unk_token, tokenizer.mask_token,
             tokenizer.cls_token, tokenizer.sep_token}
    codes = [tokenizer.src_lang] + [token.strip("_") for token in tokenizer.all_special_tokens if token not in plain]
    return list(dict.fromkeys(code for code in codes if code))[:6]


def apply(tokenizer, source_lang: str | None, target_lang: str | None, model_name: str) -> dict:
    """Set the tokenizer's source and target languages; returns what deployment needs (`info` entries)."""
    if not is_multilingual(tokenizer):
        if source_lang or target_lang:
            raise UserError(
                f"task.source_lang/task.target_lang: the tokenizer of `{model_name}` ({type(tokenizer).__name__}) has "
                "no language codes; remove them (a text prompt goes in task.source_prefix)"
            )
        return {}
    if not (source_lang and target_lang):
        raise UserError(
            f"task.source_lang and task.target_lang: `{model_name}` is a multilingual model whose tokenizer "
            f"({type(tokenizer).__name__}) marks every sequence with a language code; set both, e.g. "
            f"{', '.join(_examples(tokenizer))} (without them every target is tagged as its default language)"
        )
    _language_token(tokenizer, source_lang, target=False)
    _language_token(tokenizer, target_lang, target=True)
    return {"source_lang": source_lang, "target_lang": target_lang}


def use(tokenizer, info: dict) -> None:
    """Encode the next sources and targets in the languages an adapter was trained on."""
    if info.get("source_lang"):
        tokenizer.src_lang, tokenizer.tgt_lang = info["source_lang"], info["target_lang"]


def decoder_start(tokenizer, target_lang: str | None) -> dict:
    """`generate` arguments that make the decoder write in the target language: a forced first token where targets
    begin with their code (NLLB, M2M100, mBART-50), the decoder start where they end with it (mBART)."""
    if not target_lang:
        return {}
    token, first = _language_token(tokenizer, target_lang, target=True)
    return {"forced_bos_token_id": token} if first else {"decoder_start_token_id": token}
