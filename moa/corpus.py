"""Offline training corpora for expert LoRA adapters: question/answer pairs labelled by segment.

Both sources ship as Debian packages, so the corpus builds without a network:

* WordNet 3.0 (`wordnet-base`): noun definitions and usage examples. Each synset is labelled
  with one of the fifteen knowledge domains in `WORDNET_SEGMENTS`, or dropped.
* FreeDict English-French, English-Spanish and English-German (`dict-freedict-eng-*`): word
  translations, one segment per language (`LANGUAGE_SEGMENTS`).

Pairs are split into train, validation and test by a stable hash of their term, so no test term
appears in training. `build_corpus` writes the splits as JSONL files plus `stats.json`, and
`python -m moa.corpus --out-dir DIR` does the same from the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gzip
import hashlib
import json
import logging
import os
import random
import re
import tempfile
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

Segment = str
"""Name of a domain or language, e.g. "law" or "german"; one LoRA adapter is trained per segment."""

WORDNET_SEGMENTS: tuple[Segment, ...] = (
    "plants", "animals", "medicine", "chemistry", "food", "law", "music", "computing",
    "sport", "military", "geography", "mathematics", "physics", "religion", "economics",
)  # fmt: skip
LANGUAGE_SEGMENTS: dict[Segment, str] = {"french": "fra", "spanish": "spa", "german": "deu"}
"""Translation segments and the ISO 639-3 code of their FreeDict dictionary (`freedict-eng-CODE`)."""
SEGMENTS: tuple[Segment, ...] = WORDNET_SEGMENTS + tuple(LANGUAGE_SEGMENTS)
SPLITS: tuple[str, ...] = ("train", "validation", "test")

DEFAULT_WORDNET_DIR = Path("/usr/share/wordnet")
DEFAULT_FREEDICT_DIR = Path("/usr/share/dictd")
DEFAULT_MAX_TERMS_PER_SEGMENT = 1500
DEFAULT_TEMPLATES_PER_TERM = 3
DEFAULT_SPLIT_FRACTIONS: tuple[float, float, float] = (0.8, 0.1, 0.1)
MAX_RESPONSE_CHARS = 200
"""Definitions and usage examples longer than this are cut at a clause boundary."""
MAX_TRANSLATIONS = 3
"""A translation response lists at most this many target-language words."""
MAX_TERM_WORDS = 4
MAX_TERM_CHARS = 40

INSTALL_HINT = (
    "Install the data with `apt-get install wordnet-base dict-freedict-eng-fra "
    "dict-freedict-eng-spa dict-freedict-eng-deu`, or run `make data`."
)

DATA_LICENCES: dict[str, str] = {
    "wordnet": (
        "WordNet 3.0 licence (Princeton University): use, copying, modification and distribution "
        "for any purpose without fee, provided that the notice 'WordNet 3.0 Copyright 2006 by "
        "Princeton University. All rights reserved.' and the licence's disclaimer appear on all copies."
    ),
    "freedict-eng-deu": (
        "GPL-3.0-or-later: FreeDict English-German 1.9-fd1, from the Ding dictionary "
        "(Copyright 1995-2022 Frank Richter, 2020-2022 Einhard Leichtfuss). "
        "The ding2tei importer that converted it is AGPL-3.0 and is not part of the data."
    ),
    "freedict-eng-fra": (
        "GPL-2.0-or-later: FreeDict English-French 0.1.6 (Copyright 1999-2017 FreeDict "
        "contributors), generated from the Ergane dictionary."
    ),
    "freedict-eng-spa": (
        "GPL-2.0-or-later: FreeDict English-Spanish 0.3.1 (Copyright 1999-2019 FreeDict "
        "contributors), generated from the Ergane dictionary."
    ),
}
"""Licence of each built-in data source, for model cards. Taken from the `00-database-info`
headers of the Debian dictd files and from /usr/share/doc/{wordnet-base,dict-freedict-*}/copyright."""


def source_licence(source: str, default: str | None = None) -> str:
    """Return the licence of a built-in data source such as "wordnet" or "freedict-eng-fra".

    Raises ValueError for any other source (a user's JSONL file, for example) unless `default`
    is given, because the licence of user data is not known here.
    """
    if source in DATA_LICENCES:
        return DATA_LICENCES[source]
    if default is not None:
        return default
    raise ValueError(
        f"No licence is recorded for data source {source!r}; known sources are "
        f"{sorted(DATA_LICENCES)}. Pass default=... to use a licence you have checked yourself."
    )


# --------------------------------------------------------------------------------------------
# Examples and JSONL files


@dataclass
class Example:
    """One prompt/response pair, the segment it trains and the term it was built from."""

    prompt: str
    """User turn, e.g. "What is a fjord?"."""
    response: str
    """Expected assistant turn."""
    segment: Segment | None = None
    """Domain or language of the pair; None before the pair is segmented."""
    term: str = ""
    """Word or phrase the pair is about; the split is a hash of it. Empty means the prompt."""
    source: str = "user"
    """Origin of the pair: "wordnet", "freedict-eng-deu", or a JSONL file name."""
    split: str | None = None
    """"train", "validation" or "test"; None before splitting."""

    def __post_init__(self) -> None:
        for name in ("prompt", "response", "source"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"Example.{name} must be a non-empty string, got {value!r}.")
        if not isinstance(self.term, str):
            raise ValueError(f"Example.term must be a string, got {self.term!r}.")
        if not self.term.strip():
            self.term = self.prompt
        if self.segment is not None and (not isinstance(self.segment, str) or not self.segment.strip()):
            raise ValueError(f"Example.segment must be None or a non-empty string, got {self.segment!r}.")
        if self.split is not None and self.split not in SPLITS:
            raise ValueError(f"Example.split must be None or one of {SPLITS}, got {self.split!r}.")

    def to_dict(self) -> dict[str, Any]:
        """Return the example as a JSON-ready dict with every field."""
        return {item.name: getattr(self, item.name) for item in dataclasses.fields(self)}


def _atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to a temporary file next to `path`, then rename it over `path`.

    Readers see either the old file or the complete new one, never a partial write.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    )
    try:
        with handle:
            handle.write(text)
        os.chmod(handle.name, 0o644)  # NamedTemporaryFile creates 0600; corpus files are not secret
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def write_jsonl(path: str | Path, records: Iterable[Example | Mapping[str, Any]]) -> Path:
    """Write one JSON object per line to `path`, atomically, and return the path."""
    path = Path(path)
    lines = []
    for record in records:
        data = record.to_dict() if isinstance(record, Example) else dict(record)
        lines.append(json.dumps(data, ensure_ascii=False) + "\n")
    _atomic_write_text(path, "".join(lines))
    return path


def _iter_jsonl(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line; errors name the file and line."""
    if not path.is_file():
        raise FileNotFoundError(f"JSONL file not found: {path}.")
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{path}, line {line_number}: invalid JSON ({error.msg}). "
                    "Each line must be one JSON object."
                ) from error
            if not isinstance(record, dict):
                raise ValueError(
                    f"{path}, line {line_number}: expected a JSON object, got {type(record).__name__}."
                )
            yield line_number, record


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a file of one JSON object per line; blank lines are skipped.

    Raises FileNotFoundError for a missing file and ValueError, naming the file and line, for a
    line that is not a JSON object.
    """
    return [record for _, record in _iter_jsonl(Path(path))]


_OPTIONAL_STRING_FIELDS = ("segment", "term", "source", "split")


def _example_from_record(record: dict[str, Any], path: Path, line_number: int) -> Example:
    """Check the fields of one user record and build its Example; errors name the file and line."""
    where = f"{path}, line {line_number}"
    for name in ("prompt", "response"):
        if name not in record:
            raise ValueError(f"{where}: field {name!r} is missing; every line needs 'prompt' and 'response'.")
        if not isinstance(record[name], str) or not record[name].strip():
            raise ValueError(f"{where}: field {name!r} must be a non-empty string, got {record[name]!r}.")
    for name in _OPTIONAL_STRING_FIELDS:
        value = record.get(name)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{where}: field {name!r} must be a string or null, got {value!r}.")
    split = record.get("split")
    if split is not None and split not in SPLITS:
        raise ValueError(f"{where}: field 'split' must be one of {SPLITS} or null, got {split!r}.")
    segment = record.get("segment")
    return Example(
        prompt=record["prompt"],
        response=record["response"],
        segment=segment if segment and segment.strip() else None,
        term=record.get("term") or record["prompt"],
        source=record.get("source") or path.name,
        split=split,
    )


def load_jsonl(path: str | Path) -> list[Example]:
    """Load a user corpus: JSONL lines with "prompt", "response" and optionally "segment".

    Optional "term", "source" and "split" fields are kept, so files written by `build_corpus`
    load too. The term defaults to the prompt and the source to the file name.
    """
    path = Path(path)
    examples = [_example_from_record(record, path, line_number) for line_number, record in _iter_jsonl(path)]
    if not examples:
        # A split of a small corpus can be empty, so this is not an error.
        logger.warning("%s contains no examples", path)
    return examples


# --------------------------------------------------------------------------------------------
# Train/validation/test split by term


def _normalise_term(term: str) -> str:
    return " ".join(term.casefold().split())


def _check_split_fractions(fractions: Sequence[float]) -> None:
    if len(fractions) != len(SPLITS) or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(
            f"split fractions must be three non-negative numbers (train, validation, test) "
            f"that sum to 1, got {tuple(fractions)}."
        )


def split_for_term(term: str, fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS) -> str:
    """Return the split of `term`, the same in every process and on every machine.

    The split depends only on the case-folded term, through SHA-256 (Python's `hash()` is salted
    per process), so all pairs about one term share a split and no test term is trained on.
    """
    _check_split_fractions(fractions)
    digest = hashlib.sha256(_normalise_term(term).encode("utf-8")).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    cumulative = 0.0
    for split, fraction in zip(SPLITS, fractions):
        cumulative += fraction
        if position < cumulative:
            return split
    return SPLITS[-1]


def assign_splits(
    examples: Iterable[Example], fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS
) -> list[Example]:
    """Return copies of `examples` with `split` set from their term by `split_for_term`."""
    _check_split_fractions(fractions)
    return [dataclasses.replace(example, split=split_for_term(example.term, fractions)) for example in examples]


def _stable_rank(text: str) -> int:
    """Return a pseudo-random but reproducible sort key, to break ties without favouring A-Z.

    The "rank:" salt makes the key independent of `split_for_term`: with the split's own hash,
    a per-segment cap would keep mostly the terms that hash low, which are all train terms.
    """
    return int.from_bytes(hashlib.sha256(b"rank:" + text.encode("utf-8")).digest()[:8], "big")


# --------------------------------------------------------------------------------------------
# WordNet database files

NOUN_LEXFILES: dict[str, int] = {
    "noun.Tops": 3, "noun.act": 4, "noun.animal": 5, "noun.artifact": 6, "noun.attribute": 7,
    "noun.body": 8, "noun.cognition": 9, "noun.communication": 10, "noun.event": 11,
    "noun.feeling": 12, "noun.food": 13, "noun.group": 14, "noun.location": 15, "noun.motive": 16,
    "noun.object": 17, "noun.person": 18, "noun.phenomenon": 19, "noun.plant": 20,
    "noun.possession": 21, "noun.process": 22, "noun.quantity": 23, "noun.relation": 24,
    "noun.shape": 25, "noun.state": 26, "noun.substance": 27, "noun.time": 28,
}  # fmt: skip
"""Lexicographer file numbers of nouns (the lex_filenum field), as listed in WordNet's lexnames(5WN)."""

HYPONYM_POINTERS = ("~", "~i")
HYPERNYM_POINTERS = ("@", "@i")
MEMBER_MERONYM_POINTER = "%m"
"""Has-member pointer, e.g. from the genus "Taraxacum" to "dandelion"."""
TOPIC_POINTER = ";c"
"""Domain-of-synset (topic) pointer, e.g. from "tort" to "law"."""
_ORGANISM_LEXFILES = frozenset((NOUN_LEXFILES["noun.animal"], NOUN_LEXFILES["noun.plant"]))


@dataclass(frozen=True)
class Synset:
    """A noun synset parsed from one line of WordNet's data.noun."""

    offset: str
    """Byte offset of the line in data.noun, which WordNet uses as the synset id."""
    lexfile: int
    """Lexicographer file number, see `NOUN_LEXFILES`."""
    lemmas: tuple[str, ...]
    """Words of the synset as written in the file, with underscores for spaces."""
    lex_ids: tuple[int, ...]
    """Per-lemma lexical id, needed to build sense keys."""
    pointers: tuple[tuple[str, str], ...]
    """(pointer symbol, target offset) for pointers to other noun synsets."""
    gloss: str
    """Definition, then usage examples in double quotes, separated by semicolons."""

    def targets(self, symbols: Sequence[str]) -> list[str]:
        """Return the offsets this synset points to with any of `symbols`."""
        return [target for symbol, target in self.pointers if symbol in symbols]


@dataclass
class WordNet:
    """The parts of WordNet 3.0 that the corpus builder uses."""

    synsets: dict[str, Synset]
    """Noun synsets by offset."""
    senses: dict[str, list[str]]
    """Lower-case lemma (underscores kept) to its noun synset offsets, most frequent sense first."""
    tag_counts: dict[str, int] = field(default_factory=dict)
    """Sense key to how often the sense is tagged in WordNet's semantic concordance (cntlist.rev)."""

    @functools.cached_property
    def word_counts(self) -> dict[str, int]:
        """Lower-case lemma to its tag count summed over all senses and parts of speech."""
        counts: Counter[str] = Counter()
        for sense_key, count in self.tag_counts.items():
            counts[sense_key.partition("%")[0]] += count
        return dict(counts)

    @functools.cached_property
    def pos_counts(self) -> dict[str, Counter[str]]:
        """Lower-case lemma to tag counts per part of speech ("n", "v", "a", "r")."""
        counts: dict[str, Counter[str]] = {}
        for sense_key, count in self.tag_counts.items():
            lemma, _, rest = sense_key.partition("%")
            counts.setdefault(lemma, Counter())[_WORDNET_POS_BY_SS_TYPE.get(rest[:1], "n")] += count
        return counts

    def usual_pos(self, lemma: str) -> str | None:
        """Return the part of speech in which `lemma` is tagged most often, or None if never tagged."""
        counts = self.pos_counts.get(lemma.lower().replace(" ", "_"))
        if not counts or max(counts.values()) == 0:
            return None
        return counts.most_common(1)[0][0]

    def word_count(self, lemma: str) -> int:
        """Return how often `lemma` is tagged over all its senses and parts of speech."""
        return self.word_counts.get(lemma.lower().replace(" ", "_"), 0)

    def resolve(self, sense_name: str) -> str | None:
        """Return the offset of a sense name such as "disease.n.01", or None if it is absent."""
        match = re.fullmatch(r"(.+)\.n\.(\d+)", sense_name)
        if match is None:
            raise ValueError(f"Sense name must look like 'lemma.n.01', got {sense_name!r}.")
        offsets = self.senses.get(match.group(1).lower(), [])
        index = int(match.group(2)) - 1
        return offsets[index] if 0 <= index < len(offsets) else None


def noun_sense_key(lemma: str, lexfile: int, lex_id: int) -> str:
    """Return WordNet's sense key of a noun lemma, e.g. "fjord%1:17:00::"."""
    return f"{lemma.lower()}%1:{lexfile:02d}:{lex_id:02d}::"


def parse_data_line(line: str) -> Synset:
    """Parse one synset line of a WordNet data file (format described in wndb(5WN))."""
    fields, _, gloss = line.partition(" | ")
    parts = fields.split()
    word_count = int(parts[3], 16)
    words = parts[4 : 4 + 2 * word_count]
    cursor = 4 + 2 * word_count
    pointer_count = int(parts[cursor])
    pointers = []
    for index in range(pointer_count):
        symbol, target, pos = parts[cursor + 1 + 4 * index : cursor + 4 + 4 * index]
        if pos == "n":
            pointers.append((symbol, target))
    return Synset(
        offset=parts[0],
        lexfile=int(parts[1]),
        lemmas=tuple(words[0::2]),
        lex_ids=tuple(int(lex_id, 16) for lex_id in words[1::2]),
        pointers=tuple(pointers),
        gloss=gloss.strip(),
    )


def _read_database_lines(path: Path) -> Iterable[tuple[int, str]]:
    """Yield (line number, line) of a WordNet database file, skipping the licence header."""
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if line.startswith("  ") or not line.strip():
                continue
            yield line_number, line


def _parse_index_noun(path: Path) -> dict[str, list[str]]:
    senses = {}
    for line_number, line in _read_database_lines(path):
        parts = line.split()
        try:
            synset_count = int(parts[2])
        except (IndexError, ValueError) as error:
            raise ValueError(f"{path}, line {line_number}: not a WordNet index line: {line[:80]!r}.") from error
        senses[parts[0]] = parts[-synset_count:]
    return senses


def _parse_tag_counts(path: Path) -> dict[str, int]:
    counts = {}
    for line_number, line in _read_database_lines(path):
        parts = line.split()
        if len(parts) != 3 or not parts[2].isdigit():
            raise ValueError(f"{path}, line {line_number}: expected 'sense_key sense_number count'.")
        counts[parts[0]] = int(parts[2])
    return counts


WORDNET_FILES = ("data.noun", "index.noun", "cntlist.rev")


def load_wordnet(wordnet_dir: str | Path = DEFAULT_WORDNET_DIR) -> WordNet:
    """Load noun synsets, noun sense order and tag counts from a WordNet 3.x database folder."""
    wordnet_dir = Path(wordnet_dir)
    _require_files([wordnet_dir / name for name in WORDNET_FILES])
    synsets = {}
    data_path = wordnet_dir / "data.noun"
    for line_number, line in _read_database_lines(data_path):
        try:
            synset = parse_data_line(line)
        except (IndexError, ValueError) as error:
            raise ValueError(f"{data_path}, line {line_number}: not a WordNet synset line: {line[:80]!r}.") from error
        synsets[synset.offset] = synset
    wordnet = WordNet(
        synsets=synsets,
        senses=_parse_index_noun(wordnet_dir / "index.noun"),
        tag_counts=_parse_tag_counts(wordnet_dir / "cntlist.rev"),
    )
    logger.debug("Loaded %d noun synsets from %s", len(synsets), wordnet_dir)
    return wordnet


def _require_files(paths: Sequence[Path]) -> None:
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"Corpus source files not found: {', '.join(missing)}. {INSTALL_HINT}")


# --------------------------------------------------------------------------------------------
# Domain labels for WordNet synsets


@dataclass(frozen=True)
class DomainRule:
    """Membership rule of one knowledge-domain segment: the WordNet noun synsets that belong to it."""

    segment: Segment
    lexfiles: tuple[str, ...] = ()
    """Lexicographer files whose synsets all belong to the segment, e.g. "noun.plant"."""
    roots: tuple[str, ...] = ()
    """Sense names ("disease.n.01") of synsets whose hyponym trees belong to the segment.

    Topic synsets go here too: a synset with a domain-topic pointer (`;c`) to a synset under a
    root belongs to the segment, e.g. "tort" points to "law"."""
    excluded: tuple[str, ...] = ()
    """Sense names of synsets whose hyponym trees are kept out of every segment, because a root or
    topic reaches them through a too general concept."""

    def __post_init__(self) -> None:
        if self.segment not in WORDNET_SEGMENTS:
            raise ValueError(f"DomainRule.segment must be one of {WORDNET_SEGMENTS}, got {self.segment!r}.")
        unknown = [name for name in self.lexfiles if name not in NOUN_LEXFILES]
        if unknown:
            raise ValueError(f"DomainRule.lexfiles has unknown lexicographer files {unknown}; see NOUN_LEXFILES.")


# Sense numbers follow WordNet 3.0's index.noun order. Roots were chosen by reading their glosses:
# e.g. "drug.n.01" is "a substance that is used as a medicine or narcotic".
DOMAIN_RULES: tuple[DomainRule, ...] = (
    DomainRule("plants", ("noun.plant",), ("plant.n.02", "botany.n.02")),
    DomainRule("animals", ("noun.animal",), ("animal.n.01", "zoology.n.02")),
    DomainRule("food", ("noun.food",), ("food.n.01", "food.n.02", "nutriment.n.01", "beverage.n.01", "cooking.n.01")),
    DomainRule(
        "geography",
        (),
        (
            "geography.n.01", "geology.n.01", "meteorology.n.02", "region.n.03", "continent.n.01",
            "island.n.01", "landmass.n.01", "body_of_water.n.01", "geological_formation.n.01",
            "atmospheric_phenomenon.n.01", "weather.n.01", "volcano.n.01",
        ),
    ),  # fmt: skip
    DomainRule(
        "medicine",
        (),
        (
            "medicine.n.01", "medicine.n.02", "medicine.n.03", "pharmacology.n.01", "disease.n.01",
            "illness.n.01", "disorder.n.01", "symptom.n.01", "injury.n.01", "medical_procedure.n.01",
            "drug.n.01", "medical_instrument.n.01", "health_professional.n.01",
        ),
    ),  # fmt: skip
    DomainRule(
        "chemistry",
        (),
        (
            "chemistry.n.01", "chemical_element.n.01", "compound.n.02", "chemical.n.01", "acid.n.01",
            "base.n.10", "chemical_reaction.n.01", "molecule.n.01",
        ),
    ),  # fmt: skip
    DomainRule(
        "law",
        (),
        (
            "law.n.01", "law.n.02", "legal_document.n.01", "crime.n.01", "court.n.01", "court.n.02",
            "lawyer.n.01", "judge.n.01", "legal_action.n.01",
        ),
    ),  # fmt: skip
    DomainRule(
        "music",
        (),
        (
            "music.n.01", "musical_instrument.n.01", "musical_composition.n.01", "musician.n.01",
            "musician.n.02", "singer.n.01", "musical_notation.n.01", "genre.n.03", "note.n.03",
        ),
        excluded=("section.n.01",),  # a part of any composition, written or musical
    ),  # fmt: skip
    DomainRule(
        "computing",
        (),
        (
            "computer_science.n.01", "computer.n.01", "program.n.07", "software.n.01",
            "computer_network.n.01", "algorithm.n.01", "data_structure.n.01", "programming_language.n.01",
        ),
    ),  # fmt: skip
    DomainRule("sport", (), ("sport.n.01", "athletic_game.n.01", "athlete.n.01", "sports_equipment.n.01")),
    DomainRule(
        "military",
        (),
        (
            "military.n.01", "weapon.n.01", "military_unit.n.01", "military_officer.n.01",
            "serviceman.n.01", "military_action.n.01", "war.n.01",
        ),
    ),  # fmt: skip
    DomainRule(
        "mathematics",
        (),
        ("mathematics.n.01", "statistics.n.01", "plane_figure.n.01", "solid_figure.n.01", "mathematician.n.01"),
    ),
    DomainRule(
        "physics",
        (),
        (
            "physics.n.01", "electronics.n.01", "astronomy.n.01", "physical_phenomenon.n.01",
            "elementary_particle.n.01", "atom.n.01", "physicist.n.01",
        ),
    ),  # fmt: skip
    DomainRule(
        "religion",
        (),
        (
            "religion.n.01", "religion.n.02", "theology.n.01", "deity.n.01", "spiritual_being.n.01",
            "clergyman.n.01", "religious_person.n.01", "place_of_worship.n.01", "sacred_text.n.01",
            "mythology.n.01", "greek_mythology.n.01", "roman_mythology.n.01", "norse_mythology.n.01",
            "classical_mythology.n.01", "judaism.n.01", "christianity.n.01", "islam.n.01",
            "hinduism.n.01", "roman_catholic.n.02", "old_testament.n.01", "new_testament.n.01",
        ),
    ),  # fmt: skip
    DomainRule(
        "economics",
        (),
        (
            "economics.n.01", "finance.n.01", "commerce.n.01", "money.n.01", "monetary_unit.n.01",
            "financial_institution.n.01", "tax.n.01", "market.n.01", "economist.n.01",
            "commercial_enterprise.n.02", "economic_process.n.01",
        ),
        excluded=("establishment.n.04",),  # any business, government or school building
    ),  # fmt: skip
)


_EXCLUDED = ""
"""Label of synsets that a rule keeps out of every segment; removed before labels are returned."""


def _resolve_all(wordnet: WordNet, sense_names: Iterable[str], segment: Segment) -> list[str]:
    offsets = []
    for sense_name in sense_names:
        offset = wordnet.resolve(sense_name)
        if offset is None or offset not in wordnet.synsets:
            logger.debug("Sense %s of segment %s is not in this WordNet", sense_name, segment)
            continue
        offsets.append(offset)
    return offsets


def _direct_labels(wordnet: WordNet, rules: Sequence[DomainRule]) -> dict[str, Segment]:
    """Label the synsets of each rule's lexicographer files, then its roots (roots win)."""
    lexfile_segments = {NOUN_LEXFILES[name]: rule.segment for rule in rules for name in rule.lexfiles}
    labels = {
        offset: lexfile_segments[synset.lexfile]
        for offset, synset in wordnet.synsets.items()
        if synset.lexfile in lexfile_segments
    }
    for rule in rules:
        for offset in _resolve_all(wordnet, rule.roots, rule.segment):
            labels[offset] = rule.segment
    return labels


def _excluded_labels(wordnet: WordNet, rules: Sequence[DomainRule]) -> dict[str, Segment]:
    return {offset: _EXCLUDED for rule in rules for offset in _resolve_all(wordnet, rule.excluded, rule.segment)}


def _inherit_labels(wordnet: WordNet, own: Mapping[str, Segment]) -> dict[str, Segment]:
    """Give each synset without its own label the label of its first hypernym.

    WordNet lists a synset's main hypernym first: "sculpture" is a plastic art first and a
    solid figure second, so it does not inherit mathematics. Following only first hypernyms
    turns the hypernym graph into a forest, which is walked from its roots down.
    """
    children: dict[str, list[str]] = {}
    roots = []
    for offset, synset in wordnet.synsets.items():
        parents = [parent for parent in synset.targets(HYPERNYM_POINTERS) if parent in wordnet.synsets]
        if parents:
            children.setdefault(parents[0], []).append(offset)
        else:
            roots.append(offset)

    labels = dict(own)  # NOTE: a synset on a cycle of first hypernyms is never reached and keeps only its own label.
    queue = deque(sorted(roots))
    while queue:
        offset = queue.popleft()
        for child in children.get(offset, []):
            if child not in own and offset in labels:
                labels[child] = labels[offset]
            queue.append(child)
    return labels


def _is_field_topic(wordnet: WordNet, offset: str) -> bool:
    topic = wordnet.synsets.get(offset)
    return topic is not None and topic.lexfile not in _ORGANISM_LEXFILES


def _topic_labels(wordnet: WordNet, labels: Mapping[str, Segment]) -> dict[str, Segment]:
    """Label each synset whose domain-topic pointers (`;c`) all target topics of one segment.

    A synset with topics in several segments, or with an unlabelled topic, gets no topic label:
    "style" has the topics language, art and music, so it is not music. Topics that are animals
    or plants are skipped, because they name the organism a thing comes from or affects rather
    than a field: the food "grouse" points to "game bird".
    """
    topic_labels = {}
    for offset, synset in wordnet.synsets.items():
        fields = [topic for topic in synset.targets((TOPIC_POINTER,)) if _is_field_topic(wordnet, topic)]
        topics = {labels.get(topic) for topic in fields}
        if len(topics) == 1 and None not in topics:
            topic_labels[offset] = topics.pop()
    return topic_labels


def label_synsets(wordnet: WordNet, rules: Sequence[DomainRule] = DOMAIN_RULES) -> dict[str, Segment]:
    """Return a segment for each noun synset that belongs to a domain; others are absent.

    A synset's own label comes from, most specific first: a rule's exclusion, a topic pointer
    (`;c`) to labelled topics, being a rule's root, or being in a rule's lexicographer file.
    Topic synsets are labelled by the roots and lexicographer files alone. A synset without its
    own label inherits the label of its first hypernym.
    """
    direct = _direct_labels(wordnet, rules)
    excluded = _excluded_labels(wordnet, rules)
    topics = _topic_labels(wordnet, _inherit_labels(wordnet, {**direct, **excluded}))
    labels = _inherit_labels(wordnet, {**direct, **topics, **excluded})
    return {offset: segment for offset, segment in labels.items() if segment != _EXCLUDED}


# --------------------------------------------------------------------------------------------
# WordNet definitions as question/answer pairs

_TERM_PATTERN = re.compile(r"[A-Za-z][A-Za-z'-]*[A-Za-z]( [A-Za-z][A-Za-z'-]*[A-Za-z])*")
_LEADING_LABEL = re.compile(r"^\([^)]*\)\s*")
_FUNCTION_WORDS = frozenset(
    "of that is was with in and or to for who which on by from as at when where used".split()
)
COUNTABLE_LEXFILES = frozenset(
    NOUN_LEXFILES[name]
    for name in ("noun.animal", "noun.artifact", "noun.body", "noun.object", "noun.person", "noun.plant", "noun.shape")
)
"""Lexicographer files whose nouns are nearly all count nouns ("a fjord", not "water")."""

DEFINITION_TEMPLATES = (
    "What is {subject}?",
    "Define {term}.",
    "What does the word '{term}' mean?",
    "Explain what {subject} is.",
    "What is the meaning of '{term}'?",
    "Give a short definition of {term}.",
)
NAME_TEMPLATES = (
    "What is {name}?",
    "Tell me about {name}.",
    "Describe {name} in one sentence.",
    "What does the name '{term}' refer to?",
)
PERSON_TEMPLATES = (
    "{question_start} {term}?",
    "Tell me about {term}.",
    "Describe {term} in one sentence.",
    "What is {term} known for?",
)
USAGE_TEMPLATES = (
    "Use '{term}' in a sentence.",
    "Give an example sentence with the word '{term}'.",
    "Show how '{term}' is used in a sentence.",
)


@dataclass(frozen=True)
class WordNetTerm:
    """A term chosen for a segment, with the synset whose gloss answers questions about it."""

    term: str
    """Lemma with spaces, e.g. "musical instrument"."""
    segment: Segment
    synset: Synset
    tag_count: int
    """Tag count of this sense in the semantic concordance; higher means more common."""
    definite: bool = False
    """Whether the name takes "the" in a sentence, as in "the Nile"."""


def shorten(text: str, max_chars: int = MAX_RESPONSE_CHARS) -> str:
    """Cut `text` to at most `max_chars` at the last clause boundary ("; ", ", "), else a space."""
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    for boundary in ("; ", ", ", " - ", " "):
        cut = head.rfind(boundary)
        if cut >= max_chars // 2:
            return head[:cut].rstrip(" ,;:-")
    return head.rstrip()


def as_sentence(text: str) -> str:
    """Capitalise the first letter and end with a period unless the text already ends a sentence."""
    text = " ".join(text.split()).rstrip(" ;,:")
    if not text:
        return ""
    first_word = text.split(" ", 1)[0]
    if not any(char.isupper() for char in first_word[1:]):  # keep "pH" and "mRNA" as written
        text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?" else text + "."


def gloss_definition(gloss: str) -> str:
    """Return the definition part of a gloss, before the first quoted example, as a sentence."""
    definition = gloss.split('; "', 1)[0]
    if definition.startswith('"'):
        return ""
    definition = _LEADING_LABEL.sub("", definition.strip())
    return as_sentence(shorten(definition))


def gloss_examples(gloss: str) -> list[str]:
    """Return the quoted usage examples of a gloss, in order."""
    _, separator, rest = gloss.partition('; "')
    if not separator:
        return []
    return re.findall(r'"([^"]+)"', '"' + rest)


def usage_example(term: str, gloss: str) -> str | None:
    """Return the first usage example that contains `term` (or a form starting with it)."""
    for example in gloss_examples(gloss):
        if _contains_word_start(example.lower(), term.lower()) and len(example) <= MAX_RESPONSE_CHARS:
            return as_sentence(example)
    return None


def _contains_word_start(text: str, word: str) -> bool:
    """Tell whether `word` occurs in `text` at the start of a word ("fjords" matches "fjord")."""
    start = text.find(word)
    while start != -1:
        if start == 0 or not text[start - 1].isalnum():
            return True
        start = text.find(word, start + 1)
    return False


def _plural(word: str) -> str:
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and len(word) > 1 and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


@dataclass
class GlossCounts:
    """Word counts from WordNet glosses that tell count nouns ("a fjord") from mass nouns ("water")."""

    tokens: Counter[str]
    """Lower-case token to occurrences."""
    indefinite: Counter[str]
    """Token to occurrences as "a TOKEN" or "an TOKEN" followed by punctuation or a function word."""

    @classmethod
    def from_wordnet(cls, wordnet: WordNet) -> GlossCounts:
        """Count tokens over all noun glosses."""
        tokens: Counter[str] = Counter()
        indefinite: Counter[str] = Counter()
        for synset in wordnet.synsets.values():
            words = re.findall(r"[a-z][a-z'-]*|[^\sa-z]", synset.gloss.lower())
            tokens.update(words)
            for index in range(len(words) - 2):
                follower = words[index + 2]
                if words[index] in ("a", "an") and (not follower[0].isalpha() or follower in _FUNCTION_WORDS):
                    indefinite[words[index + 1]] += 1
        return cls(tokens=tokens, indefinite=indefinite)

    def is_countable(self, term: str, lexfile: int, gloss: str, seen_only: bool = False) -> bool:
        """Guess whether `term` takes "a"/"an"; multi-word terms are judged by their last word.

        NOTE: a heuristic that gets some words wrong. A noun seen in the glosses is countable
        when at least 1.5% of its uses follow "a"/"an", or when its plural is at least 30% as
        frequent. For an unseen noun, the lexicographer file and the gloss's first word decide,
        unless `seen_only` is set, which makes unseen nouns uncountable.
        """
        if " " in term and gloss.startswith("the "):
            return False
        word = term.lower().rsplit(" ", 1)[-1]
        seen = self.tokens[word]
        if seen:
            return self.indefinite[word] / seen >= 0.015 or self.tokens[_plural(word)] / seen >= 0.3
        if seen_only:
            return False
        return lexfile in COUNTABLE_LEXFILES or gloss.startswith(("a ", "an "))


def indefinite_article(phrase: str) -> str:
    """Return "a" or "an" for `phrase` by its spelling ("an apple", "a unicorn", "an hour")."""
    word = phrase.lower()
    if word.startswith(("hour", "honest", "honor", "honour", "heir")):
        return "an"
    if word.startswith(("uni", "use", "usu", "uti", "ure", "eu", "ewe", "one", "once", "uk")):
        return "a"
    return "an" if word[:1] in "aeiou" else "a"


_DEFINITE_NAME_CLASSES = frozenset(
    "river sea ocean gulf strait channel canal desert range mountain_range archipelago sacred_text".split()
)
"""First lemmas of the classes whose named members take "the": "the Nile", "the Bible"."""


_PLACE_LEXFILES = frozenset((NOUN_LEXFILES["noun.location"], NOUN_LEXFILES["noun.object"]))


def takes_definite_article(wordnet: WordNet, synset: Synset, term: str) -> bool:
    """Guess whether the name `term` takes "the" ("the Nile", "the Gulf of Mexico", "the First Amendment").

    NOTE: a heuristic from the name's shape and its first hypernym; it misses some names.
    """
    if not term[:1].isupper() or synset.lexfile == NOUN_LEXFILES["noun.person"]:
        return False
    if re.match(r"[A-Z][a-z]+ of ", term):
        return True
    last_word = term.rsplit(" ", 1)[-1]
    plural = " " in term and last_word.endswith("s") and not last_word.endswith(("ss", "us", "is"))
    if plural and synset.lexfile in _PLACE_LEXFILES:  # "the Virgin Islands", not "the Epsom salts"
        return True
    if " " in term and _is_instance(synset) and synset.lexfile not in _PLACE_LEXFILES:
        return True  # events and documents: "the American Civil War", but "New York"
    hypernyms = synset.targets(HYPERNYM_POINTERS)
    return bool(hypernyms) and wordnet.synsets[hypernyms[0]].lemmas[0].lower() in _DEFINITE_NAME_CLASSES


def _is_instance(synset: Synset) -> bool:
    return any(symbol == "@i" for symbol, _ in synset.pointers)


def _definition_prompts(item: WordNetTerm, gloss_counts: GlossCounts) -> tuple[str, ...]:
    """Fill the templates that fit the term: a person, another name, or a common noun."""
    term, synset = item.term, item.synset
    proper = term[0].isupper()
    if proper and _is_instance(synset) and synset.lexfile == NOUN_LEXFILES["noun.person"]:
        # Glosses of dead people end with their life span, e.g. "(1756-1791)".
        question_start = "Who was" if re.search(r"\d{3,4}-\d{3,4}\)", synset.gloss) else "Who is"
        return tuple(template.format(question_start=question_start, term=term) for template in PERSON_TEMPLATES)
    possessive = "'s " in term  # "Planck's law" reads as a name
    if proper or possessive:
        # A name takes "a" only with gloss evidence ("a Christian"), so not "a Megaera".
        seen_countable = gloss_counts.is_countable(term, synset.lexfile, synset.gloss, seen_only=True)
        countable = seen_countable and not possessive
    else:
        countable = gloss_counts.is_countable(term, synset.lexfile, synset.gloss)
    if (proper or possessive) and (_is_instance(synset) or not countable):
        name = f"the {term}" if item.definite else term
        return tuple(template.format(name=name, term=term) for template in NAME_TEMPLATES)
    subject = f"{indefinite_article(term)} {term}" if countable else term
    return tuple(template.format(subject=subject, term=term) for template in DEFINITION_TEMPLATES)


def wordnet_examples(
    item: WordNetTerm, gloss_counts: GlossCounts, rng: random.Random, templates_per_term: int
) -> list[Example]:
    """Build definition pairs from sampled templates, plus one usage pair when the gloss has one."""
    definition = gloss_definition(item.synset.gloss)
    prompts = _definition_prompts(item, gloss_counts)
    chosen = rng.sample(prompts, min(templates_per_term, len(prompts)))
    examples = [
        Example(prompt=prompt, response=definition, segment=item.segment, term=item.term, source="wordnet")
        for prompt in chosen
    ]
    example_sentence = usage_example(item.term, item.synset.gloss)
    if example_sentence is not None:
        prompt = rng.choice(USAGE_TEMPLATES).format(term=item.term)
        examples.append(
            Example(prompt=prompt, response=example_sentence, segment=item.segment, term=item.term, source="wordnet")
        )
    return examples


def _sense_tag_count(wordnet: WordNet, lemma: str, offset: str) -> int:
    """Return the tag count of `lemma` in synset `offset` (0 when the pair is not a sense)."""
    synset = wordnet.synsets.get(offset)
    if synset is None:
        return 0
    for synset_lemma, lex_id in zip(synset.lemmas, synset.lex_ids):
        if synset_lemma.lower() == lemma.lower():
            return wordnet.tag_counts.get(noun_sense_key(synset_lemma, synset.lexfile, lex_id), 0)
    return 0


def _is_clean_term(term: str) -> bool:
    return len(term) <= MAX_TERM_CHARS and term.count(" ") < MAX_TERM_WORDS and bool(_TERM_PATTERN.fullmatch(term))


def _is_dominant_sense(wordnet: WordNet, lemma: str, offset: str) -> bool:
    """Tell whether no more frequent sense of `lemma` was ever tagged in the concordance.

    A question such as "What is a body?" should be answered with the word's usual meaning, so a
    rare sense only stands for the word when the word's earlier senses are rare too.
    """
    for other in wordnet.senses.get(lemma.lower(), []):
        if other == offset:
            return True
        if _sense_tag_count(wordnet, lemma, other) > 0:
            return False
    return False


def _is_taxon(synset: Synset) -> bool:
    """Tell whether `synset` is a taxonomic group such as a genus or family of plants.

    Taxa are the animal and plant synsets with members; a city such as "Paris" has members
    ("Parisian") too, but is in noun.location.
    """
    has_members = any(symbol == MEMBER_MERONYM_POINTER for symbol, _ in synset.pointers)
    return has_members and synset.lexfile in _ORGANISM_LEXFILES


def _sense_rank(wordnet: WordNet, lemma: str, offset: str) -> int:
    """Return the position of synset `offset` among the senses of `lemma`, 0 being the most frequent."""
    offsets = wordnet.senses.get(lemma.lower(), [])
    return offsets.index(offset) if offset in offsets else len(offsets)


def _best_lemma(wordnet: WordNet, synset: Synset) -> tuple[str, int] | None:
    """Return the lemma of `synset` with the highest tag count among clean, dominant lemmas."""
    best: tuple[str, int] | None = None
    for lemma in synset.lemmas:
        if not _is_clean_term(lemma.replace("_", " ")) or not _is_dominant_sense(wordnet, lemma, synset.offset):
            continue
        count = _sense_tag_count(wordnet, lemma, synset.offset)
        if best is None or count > best[1]:
            best = (lemma, count)
    return best


def select_wordnet_terms(
    wordnet: WordNet,
    labels: Mapping[str, Segment],
    max_terms_per_segment: int = DEFAULT_MAX_TERMS_PER_SEGMENT,
    gloss_counts: GlossCounts | None = None,
) -> dict[Segment, list[WordNetTerm]]:
    """Choose up to `max_terms_per_segment` terms per segment, common terms first.

    Taxonomic groups such as "Taraxacum" come last. The other terms are ranked by tag count,
    then by how often the word appears in WordNet's glosses (`gloss_counts`), then single words
    before phrases. Each lemma is used once over all segments, with its most frequent labelled
    sense, so "What is a bass?" has one response.
    """
    by_lemma: dict[str, tuple[int, WordNetTerm]] = {}
    for offset in sorted(labels):
        synset = wordnet.synsets[offset]
        best = _best_lemma(wordnet, synset)
        if best is None or not gloss_definition(synset.gloss):
            continue
        lemma, count = best
        rank = _sense_rank(wordnet, lemma, offset)
        key = lemma.lower()
        if key not in by_lemma or rank < by_lemma[key][0]:
            term = lemma.replace("_", " ")
            definite = takes_definite_article(wordnet, synset, term)
            item = WordNetTerm(term=term, segment=labels[offset], synset=synset, tag_count=count, definite=definite)
            by_lemma[key] = (rank, item)

    def priority(item: WordNetTerm) -> tuple[bool, int, int, int, int]:
        mentions = gloss_counts.tokens[item.term.lower()] if gloss_counts is not None else 0
        return (_is_taxon(item.synset), -item.tag_count, -mentions, item.term.count(" "), _stable_rank(item.term))

    per_segment: dict[Segment, list[WordNetTerm]] = {}
    for _, item in by_lemma.values():
        per_segment.setdefault(item.segment, []).append(item)
    return {
        segment: sorted(items, key=priority)[:max_terms_per_segment]
        for segment, items in sorted(per_segment.items(), key=lambda pair: WORDNET_SEGMENTS.index(pair[0]))
    }


# --------------------------------------------------------------------------------------------
# FreeDict dictionaries (dictd format)

_BASE64_DIGITS = {char: value for value, char in enumerate(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
)}  # fmt: skip
_GERMAN_ARTICLES = {"masc": "der", "fem": "die", "neut": "das", "pl": "die"}
_HEADWORD_PATTERN = re.compile(r"[a-z]{2,20}")
_ARTICLE_HEAD = re.compile(r"^(?P<headword>[^/<]*)(?:/(?P<ipa>[^/]*)/)?(?P<tags>.*)$")
_STRESS_MARKS = "ˈˌ"
_TAG_PARTS_OF_SPEECH: tuple[tuple[str, frozenset[str]], ...] = (
    ("v", frozenset({"v"})),
    ("n", frozenset({"masc", "fem", "neut", "pl", "n"})),
    ("a", frozenset({"adj", "num"})),
    ("r", frozenset({"adv"})),
)
_WORDNET_POS_BY_SS_TYPE = {"1": "n", "2": "v", "3": "a", "4": "r", "5": "a"}
TRANSLATION_TEMPLATES = (
    "Translate '{term}' into {language}.",
    "What is the {language} word for '{term}'?",
    "How do you say '{term}' in {language}?",
    "Give the {language} translation of '{term}'.",
    "What is '{term}' in {language}?",
)


def decode_dictd_number(text: str) -> int:
    """Decode a dictd index number: base 64, most significant digit first, A=0 ... /=63."""
    value = 0
    for char in text:
        if char not in _BASE64_DIGITS:
            raise ValueError(f"Invalid dictd base-64 number {text!r}: unexpected character {char!r}.")
        value = value * 64 + _BASE64_DIGITS[char]
    return value


def read_dictd_index(
    path: str | Path, keep: Callable[[str], bool] | None = None
) -> list[tuple[str, int, int]]:
    """Read a dictd .index file into (headword, byte offset, byte length) rows, in file order.

    `keep`, when given, selects headwords before their numbers are decoded, which saves time on
    large dictionaries.
    """
    path = Path(path)
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 3:
                raise ValueError(f"{path}, line {line_number}: expected 'headword<TAB>offset<TAB>length'.")
            if keep is not None and not keep(parts[0]):
                continue
            rows.append((parts[0], decode_dictd_number(parts[1]), decode_dictd_number(parts[2])))
    return rows


@dataclass(frozen=True)
class DictArticle:
    """One dictd article: a headword line, then one line per sense of translations."""

    headword: str
    pronunciation: str
    head_tags: str
    """Rest of the headword line, e.g. "<v>" for a verb in eng-deu."""
    senses: tuple[str, ...]
    """Translation lines with sense numbers ("1. ") removed."""
    example_count: int
    """Number of quoted usage examples; the main sense of a word usually has the most."""

    @property
    def part_of_speech(self) -> str | None:
        """WordNet's letter for the part of speech that the grammar tags give, or None.

        "v" for verbs, "n" for nouns (gender tags), "a" for adjectives and numerals, "r" for
        adverbs. Only eng-deu has tags.
        """
        text = " ".join((self.head_tags, *self.senses))
        tags = {tag.strip() for group in re.findall(r"<([^>]*)>", text) for tag in group.split(",")}
        for letter, names in _TAG_PARTS_OF_SPEECH:
            if tags & names:
                return letter
        return None

    @property
    def has_notes(self) -> bool:
        """Whether a sense carries a bracketed note such as "[fin.]" or "[obs.]"."""
        return any("[" in sense for sense in self.senses)


def parse_dict_article(text: str) -> DictArticle:
    """Parse a FreeDict article: "tree /triː/", then translation lines, examples and notes."""
    lines = text.strip("\n").split("\n")
    head = _ARTICLE_HEAD.match(lines[0].strip())
    senses = []
    example_count = 0
    for line in lines[1:]:
        stripped = line.strip()
        if stripped.startswith('"'):
            example_count += 1
        elif stripped and not stripped.startswith(("see:", "Synonym", "Note:")):
            senses.append(re.sub(r"^\d+\.\s*", "", stripped))
    return DictArticle(
        headword=head.group("headword").strip() if head else lines[0].strip(),
        pronunciation=(head.group("ipa") or "") if head else "",
        head_tags=head.group("tags").strip() if head else "",
        senses=tuple(senses),
        example_count=example_count,
    )


def _split_top_level(text: str, separator: str = ",") -> list[str]:
    """Split at `separator` outside (), [], <> and {}."""
    parts, depth, current = [], 0, []
    for char in text:
        if char in "([<{":
            depth += 1
        elif char in ")]>}":
            depth = max(0, depth - 1)
        if char == separator and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def clean_translation(item: str, language: str) -> str | None:
    """Return a translation without grammar tags and notes, or None when it is not usable.

    German nouns get their article from the gender tag ("Baum <masc>" becomes "der Baum").
    """
    tags = [tag.strip() for group in re.findall(r"<([^>]*)>", item) for tag in group.split(",")]
    text = re.sub(r"<[^>]*>|\[[^\]]*\]|\{[^}]*\}|\([^)]*\)", " ", item)
    text = " ".join(text.replace("\u2010", "-").split()).strip(" ;:")
    if not text or len(text) > MAX_TERM_CHARS or text.count(" ") >= MAX_TERM_WORDS:
        return None
    if re.search(r"[\d/…=+]|\w\.|\.\.", text):  # numbers, alternatives, "etw.", "ne ... pas"
        return None
    if language == "deu" and text[0].isupper():
        genders = [_GERMAN_ARTICLES[tag] for tag in tags if tag in _GERMAN_ARTICLES]
        if genders:
            text = f"{genders[0]} {text}"
    return text


def _is_plausible_article(article: DictArticle, headword: str, language: str) -> bool:
    """Tell whether an article belongs to `headword` and survived the dictionary's conversion.

    The index lists "Indonesian" and "water‐" under "indonesian" and "water", so the article's
    own headword must match. In FreeDict eng-spa 0.3.1, compounds such as "bank account" also
    appear under "bank" with the compound's longer pronunciation. Its stress-marked
    pronunciations mark compounds whose translation lost its spaces ("billetedebanco").
    """
    if article.headword != headword:
        return False
    if language != "spa":
        return True
    if any(mark in article.pronunciation for mark in _STRESS_MARKS):
        return False
    phonemes = [char for char in article.pronunciation if char.isalpha() and char != "ː"]  # not the length mark
    return len(phonemes) <= len(headword) + 3


def _article_translations(
    article: DictArticle, language: str, vocabulary: set[str] | None = None
) -> list[str]:
    """Return the clean translations of an article, the first one of each sense first.

    Listing each sense's first translation before the others puts "eau" into the response for
    "water" ("1. aquatique 2. eau, onde"), not only the adjective sense that comes first.
    """
    sense_items = [_split_top_level(sense) for sense in article.senses]
    candidates = [items[0] for items in sense_items] + [item for items in sense_items for item in items[1:]]
    translations: list[str] = []
    for candidate in candidates:
        cleaned = clean_translation(candidate, language)
        if not cleaned or cleaned in translations:
            continue
        if vocabulary is not None and is_glued(cleaned, vocabulary):
            continue
        translations.append(cleaned)
    return translations


def choose_translations(
    articles: Sequence[DictArticle],
    language: str,
    english_pos: str | None = None,
    vocabulary: set[str] | None = None,
) -> str | None:
    """Return up to three translations from the best article of one headword, or None.

    Articles are compared by these criteria, in order. First, the article matches the English
    word's usual part of speech. Next, it has no bracketed note such as "[fin.]". Next, one of
    its translations is shared by the most articles ("Gruppe" is in four of the articles for
    "group"). Last, it has the most usage examples. The first article wins ties.
    With a `vocabulary`, translations that `is_glued` finds glued are left out.
    """
    candidates = [(article, _article_translations(article, language, vocabulary)) for article in articles]
    candidates = [(article, translations) for article, translations in candidates if translations]
    if not candidates:
        return None
    shared = Counter(translation for _, translations in candidates for translation in set(translations))

    def score(candidate: tuple[DictArticle, list[str]]) -> tuple[bool, bool, int, int]:
        article, translations = candidate
        pos_matches = english_pos is not None and article.part_of_speech == english_pos
        return (pos_matches, not article.has_notes, max(shared[t] for t in translations), article.example_count)

    _, translations = max(candidates, key=score)
    translations = sorted(translations, key=lambda translation: -shared[translation])  # stable sort
    return ", ".join(translations[:MAX_TRANSLATIONS])


_COMMON_SPANISH_WORDS = frozenset(
    "a al de del el la lo los las en por para que con sin se su un una mi tu "
    "estar ser hacer hace tener dar ir poner parte primer mismo poco".split()
)
"""Frequent Spanish words added to the vocabulary of `is_glued`, because FreeDict eng-spa 0.3.1
has some of them only inside glued translations ("hace" in "hacepoco")."""


def _spanish_vocabulary(articles: Iterable[DictArticle]) -> set[str]:
    return set(_COMMON_SPANISH_WORDS) | {
        word.lower()
        for article in articles
        for sense in article.senses
        for item in _split_top_level(sense)
        for word in re.findall(r"[^\W\d_]+", item)
    }


def _vocabulary_splits(text: str, vocabulary: set[str], max_parts: int) -> Iterator[list[str]]:
    """Yield the ways to write `text` as 2 to `max_parts` vocabulary words of two letters or more."""
    for cut in range(2, len(text) - 1):
        head, tail = text[:cut], text[cut:]
        if head not in vocabulary:
            continue
        if tail in vocabulary:
            yield [head, tail]
        if max_parts > 2:
            for rest in _vocabulary_splits(tail, vocabulary, max_parts - 1):
                yield [head, *rest]


def is_glued(word: str, vocabulary: set[str]) -> bool:
    """Tell whether `word` looks like several vocabulary words with the spaces lost.

    FreeDict eng-spa 0.3.1 has such translations ("relojdepulsera", "alprincipio"). A word counts
    as glued when it splits into three or more words, into two words of four letters or more,
    or into "al"/"del" and a word. NOTE: a heuristic, measured on eng-spa 0.3.1 only: it misses
    some glued words ("hacepoco") and drops some real compounds ("medianoche").
    """
    word = word.lower()
    if " " in word or len(word) < 6:
        return False
    for parts in _vocabulary_splits(word, vocabulary, max_parts=4):
        if len(parts) >= 3 or min(len(part) for part in parts) >= 4:
            return True
        if parts[0] in ("al", "del") and len(parts[1]) >= 4:
            return True
    return False


def _freedict_paths(freedict_dir: Path, code: str) -> tuple[Path, Path]:
    stem = freedict_dir / f"freedict-eng-{code}"
    return stem.with_suffix(".index"), stem.with_suffix(".dict.dz")


@dataclass
class FreeDictionary:
    """One FreeDict dictionary in memory: the decompressed articles and where each headword's are."""

    language_code: str
    data: bytes
    rows: dict[str, list[tuple[int, int]]]
    """Single lower-case headword to the (offset, length) of each of its articles."""

    @classmethod
    def read(cls, freedict_dir: str | Path, language_code: str) -> FreeDictionary:
        """Read freedict-eng-CODE.index and .dict.dz from `freedict_dir`."""
        index_path, dict_path = _freedict_paths(Path(freedict_dir), language_code)
        _require_files([index_path, dict_path])
        rows: dict[str, list[tuple[int, int]]] = {}
        for headword, offset, length in read_dictd_index(index_path, keep=_HEADWORD_PATTERN.fullmatch):
            rows.setdefault(headword, []).append((offset, length))
        # dictd .dict.dz files are gzip files with extra random-access headers, so gzip reads them.
        with gzip.open(dict_path, "rb") as handle:
            data = handle.read()
        return cls(language_code=language_code, data=data, rows=rows)

    def articles(self, headword: str) -> list[DictArticle]:
        """Return the articles of `headword` that survived conversion intact, in file order."""
        articles = []
        for offset, length in self.rows.get(headword, []):
            article = parse_dict_article(self.data[offset : offset + length].decode("utf-8", errors="replace"))
            if _is_plausible_article(article, headword, self.language_code):
                articles.append(article)
        return articles


def read_translations(
    freedict_dir: str | Path,
    language_code: str,
    wordnet: WordNet | None,
    max_terms: int,
) -> list[tuple[str, str]]:
    """Return up to `max_terms` (English word, translation) pairs from one FreeDict dictionary.

    Only single lower-case words are used. Words that WordNet tags most often come first, then
    shorter words, so the segment teaches common vocabulary.
    """
    dictionary = FreeDictionary.read(freedict_dir, language_code)
    vocabulary = None
    if language_code == "spa":
        vocabulary = _spanish_vocabulary(chain.from_iterable(dictionary.articles(word) for word in dictionary.rows))

    def priority(word: str) -> tuple[int, int, int]:
        count = wordnet.word_count(word) if wordnet is not None else 0
        return (-count, len(word), _stable_rank(word))

    pairs = []
    for word in sorted(dictionary.rows, key=priority):
        english_pos = wordnet.usual_pos(word) if wordnet is not None else None
        translation = choose_translations(dictionary.articles(word), language_code, english_pos, vocabulary)
        if translation is not None:
            pairs.append((word, translation))
        if len(pairs) == max_terms:
            break
    return pairs


def translation_examples(
    term: str, translation: str, segment: Segment, rng: random.Random, templates_per_term: int
) -> list[Example]:
    """Build translation pairs for one English word from sampled templates."""
    language = segment.capitalize()
    source = f"freedict-eng-{LANGUAGE_SEGMENTS[segment]}"
    chosen = rng.sample(TRANSLATION_TEMPLATES, min(templates_per_term, len(TRANSLATION_TEMPLATES)))
    return [
        Example(prompt=template.format(term=term, language=language), response=translation,
                segment=segment, term=term, source=source)
        for template in chosen
    ]  # fmt: skip


# --------------------------------------------------------------------------------------------
# Building the corpus


def _term_rng(seed: int, segment: Segment, term: str) -> random.Random:
    """Return a generator that depends only on the seed, segment and term, not on build order."""
    return random.Random(f"{seed}:{segment}:{term}")


def build_examples(
    wordnet_dir: str | Path = DEFAULT_WORDNET_DIR,
    freedict_dir: str | Path = DEFAULT_FREEDICT_DIR,
    max_terms_per_segment: int = DEFAULT_MAX_TERMS_PER_SEGMENT,
    seed: int = 0,
    *,
    languages: Sequence[Segment] = tuple(LANGUAGE_SEGMENTS),
    templates_per_term: int = DEFAULT_TEMPLATES_PER_TERM,
    rules: Sequence[DomainRule] = DOMAIN_RULES,
) -> list[Example]:
    """Build all WordNet and FreeDict pairs, without splits, by segment and most common term first."""
    _check_build_arguments(max_terms_per_segment, templates_per_term, languages)
    _require_files(
        [Path(wordnet_dir) / name for name in WORDNET_FILES]
        + [path for segment in languages for path in _freedict_paths(Path(freedict_dir), LANGUAGE_SEGMENTS[segment])]
    )
    wordnet = load_wordnet(wordnet_dir)
    gloss_counts = GlossCounts.from_wordnet(wordnet)
    terms = select_wordnet_terms(wordnet, label_synsets(wordnet, rules), max_terms_per_segment, gloss_counts)

    examples: list[Example] = []
    for segment in WORDNET_SEGMENTS:
        for item in terms.get(segment, []):
            rng = _term_rng(seed, segment, item.term)
            examples.extend(wordnet_examples(item, gloss_counts, rng, templates_per_term))
    for segment in languages:
        translations = read_translations(freedict_dir, LANGUAGE_SEGMENTS[segment], wordnet, max_terms_per_segment)
        for term, translation in translations:
            rng = _term_rng(seed, segment, term)
            examples.extend(translation_examples(term, translation, segment, rng, templates_per_term))
    return examples


def _check_build_arguments(max_terms_per_segment: int, templates_per_term: int, languages: Sequence[str]) -> None:
    if max_terms_per_segment < 1:
        raise ValueError(f"max_terms_per_segment must be at least 1, got {max_terms_per_segment}.")
    if templates_per_term < 1:
        raise ValueError(f"templates_per_term must be at least 1, got {templates_per_term}.")
    unknown = [language for language in languages if language not in LANGUAGE_SEGMENTS]
    if unknown:
        raise ValueError(f"Unknown language segments {unknown}; choose from {list(LANGUAGE_SEGMENTS)}.")


def corpus_stats(examples: Sequence[Example]) -> dict[str, Any]:
    """Count distinct terms and pairs per segment, pairs per segment and split, and pairs per split.

    Examples without a segment are counted under "none" and examples without a split under "unsplit".
    """
    terms: dict[str, set[str]] = {}
    pairs: dict[str, Counter[str]] = {}
    for example in examples:
        segment = example.segment or "none"
        terms.setdefault(segment, set()).add(_normalise_term(example.term))
        pairs.setdefault(segment, Counter())[example.split or "unsplit"] += 1
    segments = {
        segment: {
            "terms": len(terms[segment]),
            "total_pairs": sum(counts.values()),
            "pairs": {split: counts.get(split, 0) for split in (*SPLITS, *sorted(set(counts) - set(SPLITS)))},
        }
        for segment, counts in pairs.items()
    }
    split_counts = Counter(example.split or "unsplit" for example in examples)
    return {"segments": segments, "splits": dict(split_counts), "total_pairs": len(examples)}


def build_corpus(
    out_dir: str | Path,
    wordnet_dir: str | Path = DEFAULT_WORDNET_DIR,
    freedict_dir: str | Path = DEFAULT_FREEDICT_DIR,
    max_terms_per_segment: int = DEFAULT_MAX_TERMS_PER_SEGMENT,
    seed: int = 0,
    *,
    languages: Sequence[Segment] = tuple(LANGUAGE_SEGMENTS),
    templates_per_term: int = DEFAULT_TEMPLATES_PER_TERM,
    split_fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
) -> dict[str, Path]:
    """Build the labelled corpus and write train/validation/test JSONL files and stats.json.

    Returns the written paths by name: "train", "validation", "test" and "stats". Each file is
    written atomically. `seed` picks the prompt templates; splits depend only on the term.
    """
    _check_split_fractions(split_fractions)
    examples = build_examples(
        wordnet_dir, freedict_dir, max_terms_per_segment, seed,
        languages=languages, templates_per_term=templates_per_term,
    )  # fmt: skip
    examples = assign_splits(examples, split_fractions)

    out_dir = Path(out_dir)
    paths = {
        split: write_jsonl(out_dir / f"{split}.jsonl", [example for example in examples if example.split == split])
        for split in SPLITS
    }
    stats = corpus_stats(examples)
    stats["parameters"] = {
        "max_terms_per_segment": max_terms_per_segment,
        "seed": seed,
        "templates_per_term": templates_per_term,
        "split_fractions": list(split_fractions),
        "languages": list(languages),
    }
    sources = sorted({example.source for example in examples})
    stats["licences"] = {source: source_licence(source) for source in sources}
    paths["stats"] = out_dir / "stats.json"
    _atomic_write_text(paths["stats"], json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
    logger.info("Wrote %d pairs in %d segments to %s", len(examples), len(stats["segments"]), out_dir)
    return paths


def _format_stats(stats: Mapping[str, Any]) -> str:
    lines = [f"{'segment':<12} {'terms':>6} {'pairs':>6} {'train':>6} {'valid':>6} {'test':>6}"]
    for segment, entry in stats["segments"].items():
        pairs = entry["pairs"]
        lines.append(
            f"{segment:<12} {entry['terms']:>6} {entry['total_pairs']:>6} "
            f"{pairs['train']:>6} {pairs['validation']:>6} {pairs['test']:>6}"
        )
    lines.append(f"total pairs: {stats['total_pairs']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point: build the corpus and print the pair counts per segment."""
    parser = argparse.ArgumentParser(description="Build the offline MoA training corpus from WordNet and FreeDict.")
    parser.add_argument(
        "--out-dir", type=Path, required=True, help="Folder for train/validation/test JSONL and stats.json."
    )
    parser.add_argument("--wordnet-dir", type=Path, default=DEFAULT_WORDNET_DIR, help="WordNet 3.x database folder.")
    parser.add_argument(
        "--freedict-dir", type=Path, default=DEFAULT_FREEDICT_DIR, help="Folder of freedict-eng-*.index and .dict.dz."
    )
    parser.add_argument(
        "--max-terms-per-segment",
        type=int,
        default=DEFAULT_MAX_TERMS_PER_SEGMENT,
        help="Maximum distinct terms per segment.",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed for the choice of prompt templates.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    paths = build_corpus(args.out_dir, args.wordnet_dir, args.freedict_dir, args.max_terms_per_segment, args.seed)
    print(_format_stats(json.loads(paths["stats"].read_text(encoding="utf-8"))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
