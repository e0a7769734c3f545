"""Our sentencepiece tokenizer as a Hugging Face fast tokenizer (tokenizer.json) that gives the same ids.

The sentencepiece model is lossless (competesmoe.data.tokenizer): identity normalisation, no dummy
prefix, no whitespace folding, byte fallback. The equivalent `tokenizers` pipeline is built here
from the model's pieces rather than by transformers' generic converter, so that every step is
visible:
  pre-tokenizer   spaces become "▁" (sentencepiece's escaping), nothing is prepended or split
  model           BPE: the pieces, with merges ordered by piece score (sentencepiece merges the
                  adjacent pair whose result scores highest); Unigram: the pieces and their scores
                  (Viterbi, as sentencepiece). Both fall back to <0xNN> byte pieces.
  post-processor  EOS before the text, as competesmoe reads every document (add_special_tokens=False
                  gives the bare ids of Tokenizer.encode)
  decoder         "▁" back to spaces, byte pieces back to UTF-8, nothing stripped
Special tokens: <unk> (id 0, also the padding token: byte fallback never produces it) and </s>
(EOS, also BOS). Text that happens to spell "</s>" is tokenized as text, as sentencepiece does
(split_special_tokens).

BPE (our default) gives sentencepiece's ids on any text (tests/test_export.py: whole speeches,
byte fallback, spelled special tokens). Unigram gives them on texts of paragraph length, with two
known differences: (1) on long texts (thousands of tokens) sentencepiece sums the lattice scores in
float32 and tokenizers in float64, so two segmentations of exactly equal score (e.g. "▁m on" and
"▁mo n") are told apart by different rounding, about once per 10k tokens; (2) tokenizers' Unigram
can match a control or byte piece that the text spells ("<0x41>") where a character of it has no
piece, which sentencepiece never matches.
"""
from __future__ import annotations

import json
from pathlib import Path

# sentencepiece's piece types (sentencepiece_model.proto)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE, _UNUSED = 1, 2, 3, 4, 6, 5
_BPE, _UNIGRAM = 2, 1
# Score of the pieces sentencepiece never matches in text (control, byte, unused): far below any
# real piece, so that Unigram's Viterbi never prefers one that a text happens to spell.
_UNMATCHABLE = -1e6


def _proto(model: bytes):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model)
    return proto


def _check_lossless(proto) -> None:
    spec = proto.normalizer_spec
    if spec.add_dummy_prefix or spec.remove_extra_whitespaces or spec.precompiled_charsmap \
            or not spec.escape_whitespaces or proto.trainer_spec.treat_whitespace_as_suffix:
        raise ValueError("this sentencepiece model normalises its input (dummy prefix, whitespace folding, "
                         "a character map or suffix whitespace); only competesmoe's lossless settings are exported")


def bpe_merges(pieces: list[str], mergeable: list[bool]) -> list[tuple[str, str]]:
    """Every split of a mergeable piece into two pieces, most valuable result first (a BPE
    sentencepiece model's pieces are in decreasing score order after the special ones)."""
    ids = {p: i for i, p in enumerate(pieces) if mergeable[i]}
    merges = []
    for piece, _ in sorted(ids.items(), key=lambda item: item[1]):
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in ids and piece[k:] in ids]
        merges += sorted(splits, key=lambda s: (ids[s[0]], ids[s[1]]))
    return merges


def build_tokenizer(model: bytes):
    """A `tokenizers.Tokenizer` that encodes and decodes like the sentencepiece model."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    proto = _proto(model)
    _check_lossless(proto)
    pieces = [p.piece for p in proto.pieces]
    kinds = [p.type for p in proto.pieces]
    unk_id = proto.trainer_spec.unk_id
    eos_id = proto.trainer_spec.eos_id
    if proto.trainer_spec.model_type == _BPE:
        mergeable = [k in (_NORMAL, _USER_DEFINED) for k in kinds]
        core = models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=bpe_merges(pieces, mergeable),
                          unk_token=pieces[unk_id], fuse_unk=True, byte_fallback=proto.trainer_spec.byte_fallback)
    elif proto.trainer_spec.model_type == _UNIGRAM:
        scores = [(p.piece, p.score if p.type in (_NORMAL, _USER_DEFINED) else _UNMATCHABLE) for p in proto.pieces]
        core = models.Unigram(scores, unk_id=unk_id, byte_fallback=proto.trainer_spec.byte_fallback)
    else:
        raise ValueError(f"sentencepiece model type {proto.trainer_spec.model_type} is neither BPE nor Unigram")
    tok = Tokenizer(core)
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = [i for i, k in enumerate(kinds) if k in (_UNKNOWN, _CONTROL)]
    tok.add_special_tokens([AddedToken(pieces[i], special=True, normalized=False) for i in specials])
    eos = pieces[eos_id]
    tok.post_processor = processors.TemplateProcessing(single=f"{eos} $A", pair=f"{eos} $A {eos} $B",
                                                       special_tokens=[(eos, eos_id)])
    return tok


def write_hf_tokenizer(model: bytes, out: Path, model_max_length: int) -> list[Path]:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json in `out`."""
    proto = _proto(model)
    eos = proto.pieces[proto.trainer_spec.eos_id].piece
    unk = proto.pieces[proto.trainer_spec.unk_id].piece
    out = Path(out)
    files = [out / "tokenizer.json", out / "tokenizer_config.json", out / "special_tokens_map.json"]
    build_tokenizer(model).save(str(files[0]))
    special = {"bos_token": eos, "eos_token": eos, "unk_token": unk, "pad_token": unk}
    files[1].write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", **special, "model_max_length": model_max_length,
        "split_special_tokens": True, "clean_up_tokenization_spaces": False, "padding_side": "left",
    }, indent=1) + "\n")
    files[2].write_text(json.dumps(special, indent=1) + "\n")
    return files
