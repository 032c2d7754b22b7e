"""Tests for moa.corpus on small WordNet and dictd files written in their real formats."""

from __future__ import annotations

import gzip
import json
import random
from collections import Counter
from pathlib import Path

import pytest

from moa import corpus
from moa.corpus import (
    DomainRule,
    Example,
    GlossCounts,
    WordNetTerm,
    assign_splits,
    build_corpus,
    choose_translations,
    clean_translation,
    decode_dictd_number,
    gloss_definition,
    gloss_examples,
    indefinite_article,
    is_glued,
    label_synsets,
    load_jsonl,
    load_wordnet,
    parse_data_line,
    parse_dict_article,
    read_dictd_index,
    read_jsonl,
    select_wordnet_terms,
    shorten,
    source_licence,
    split_for_term,
    usage_example,
    wordnet_examples,
    write_jsonl,
)

# --------------------------------------------------------------------------------------------
# A small WordNet: (key, lexfile, lemmas, pointers as (symbol, target key), gloss).
# Hyponym pointers (~, ~i) are added from the hypernym pointers, as in the real files.

FAKE_SYNSETS = [
    ("entity", 3, ["entity"], [], "that which is perceived or known or inferred to have its own distinct existence"),
    ("organism", 3, ["organism"], [("@", "entity")], "a living thing that has the ability to act or function"),
    ("plant", 3, ["plant", "flora"], [("@", "organism")], "(botany) a living organism lacking the power of locomotion"),
    ("tree", 20, ["tree"], [("@", "plant")], 'a tall perennial woody plant having a main trunk; "the tree fell in the storm"'),
    ("oak", 20, ["oak", "oak_tree"], [("@", "tree")], 'a tree of the genus Quercus; "an oak grew by the gate"'),
    ("animal", 3, ["animal"], [("@", "organism")], "a living organism characterized by voluntary movement"),
    ("dog", 5, ["dog", "domestic_dog"], [("@", "animal")], 'a member of the genus Canis; "the dog barked all night"'),
    ("dog_meat", 13, ["dog_meat"], [("@", "entity"), (";c", "dog")], "the flesh of a dog eaten as food"),
    ("artifact", 3, ["artifact"], [("@", "entity")], "a man-made object taken as a whole"),
    ("factory", 6, ["plant", "works"], [("@", "artifact")], "buildings for carrying on industrial labor"),
    ("instrument", 6, ["musical_instrument", "instrument"], [("@", "artifact")], "any of various devices used to produce musical tones"),
    ("violin", 6, ["violin", "fiddle"], [("@", "instrument")], 'bowed stringed instrument; "she played the violin"'),
    ("war_drum", 6, ["war_drum"], [("@", "instrument"), (";c", "military")], "a drum beaten to signal an attack"),
    ("art", 6, ["plastic_art"], [("@", "artifact")], "a work of art in three dimensions"),
    ("solid", 25, ["solid_figure"], [("@", "entity")], "a three-dimensional shape"),
    ("sculpture", 6, ["sculpture"], [("@", "art"), ("@", "solid")], "a three-dimensional work of plastic art"),
    ("abstraction", 3, ["abstraction"], [("@", "entity")], "a general concept formed by extracting common features"),
    ("military", 14, ["military", "armed_forces"], [("@", "abstraction")], "the military forces of a nation"),
    ("code", 10, ["code"], [("@", "abstraction"), (";c", "law"), (";c", "military")], "a set of rules or signals"),
    ("law", 14, ["law", "jurisprudence"], [("@", "abstraction")], "the collection of rules imposed by authority"),
    ("act", 4, ["act"], [("@", "abstraction")], "something that people do or cause to happen"),
    ("wrongdoing", 4, ["wrongdoing"], [("@", "act")], "departure from what is ethically acceptable"),
    ("tort", 4, ["tort", "civil_wrong"], [("@", "wrongdoing"), (";c", "law")], "any wrongdoing for which an action for damages may be brought"),
    ("libel", 4, ["libel"], [("@", "tort")], "a false and malicious publication printed to damage a person's reputation"),
    ("location", 3, ["location"], [("@", "entity")], "a point or extent in space"),
    ("region", 15, ["region"], [("@", "location")], "a large indefinite location on the surface of the Earth"),
    ("city", 15, ["city"], [("@", "region")], "a large and densely populated urban area"),
    ("paris", 15, ["Paris", "French_capital"], [("@i", "city")], "the capital and largest city of France"),
    ("water", 17, ["body_of_water", "water"], [("@", "location")], "the part of the earth's surface covered with water"),
    ("fjord", 17, ["fjord", "fiord"], [("@", "water")], 'a long narrow inlet of the sea between steep cliffs; common in Norway; "the fjords of Norway"'),
    ("river", 17, ["river"], [("@", "water")], "a large natural stream of water"),
    ("nile", 17, ["Nile", "Nile_River"], [("@i", "river")], "the world's longest river"),
]  # fmt: skip

# Lemmas with more than one noun sense, most frequent first (index.noun order).
SENSE_ORDER = {"plant": ["factory", "plant"]}

TAG_COUNTS = {  # (lemma, synset key) -> times tagged
    ("tree", "tree"): 12,
    ("dog", "dog"): 20,
    ("plant", "factory"): 5,
    ("violin", "violin"): 3,
    ("Paris", "paris"): 7,
}

TEST_RULES = (
    DomainRule("plants", ("noun.plant",), ("plant.n.02",)),
    DomainRule("animals", ("noun.animal",), ("animal.n.01",)),
    DomainRule("food", ("noun.food",)),
    DomainRule("music", (), ("musical_instrument.n.01",)),
    DomainRule("military", (), ("military.n.01",)),
    DomainRule("law", (), ("law.n.01",)),
    DomainRule("mathematics", (), ("solid_figure.n.01",)),
    DomainRule("geography", (), ("region.n.01", "body_of_water.n.01")),
)

LICENCE_HEADER = "  1 This software and database is being provided to you, the LICENSEE.\n  2 \n"


def _data_lines(offsets: dict[str, int]) -> list[str]:
    hyponyms: dict[str, list[tuple[str, str]]] = {key: [] for key, *_ in FAKE_SYNSETS}
    for key, _, _, pointers, _ in FAKE_SYNSETS:
        for symbol, target in pointers:
            if symbol in ("@", "@i"):
                hyponyms[target].append(("~" if symbol == "@" else "~i", key))
    lines = []
    for key, lexfile, lemmas, pointers, gloss in FAKE_SYNSETS:
        words = " ".join(f"{lemma} 0" for lemma in lemmas)
        all_pointers = pointers + hyponyms[key]
        pointer_text = " ".join(f"{symbol} {offsets[target]:08d} n 0000" for symbol, target in all_pointers)
        head = f"{offsets[key]:08d} {lexfile:02d} n {len(lemmas):02x} {words}"
        lines.append(f"{head} {len(all_pointers):03d} {pointer_text} | {gloss}  \n")
    return lines


def write_fake_wordnet(folder: Path) -> dict[str, str]:
    """Write data.noun, index.noun and cntlist.rev; return synset key -> offset string."""
    folder.mkdir(parents=True, exist_ok=True)
    # Offsets are fixed-width, so line lengths do not depend on their values: measure, then fill.
    draft = _data_lines({key: 0 for key, *_ in FAKE_SYNSETS})
    offsets, position = {}, len(LICENCE_HEADER.encode())
    for (key, *_), line in zip(FAKE_SYNSETS, draft):
        offsets[key] = position
        position += len(line.encode())
    (folder / "data.noun").write_text(LICENCE_HEADER + "".join(_data_lines(offsets)), encoding="utf-8")

    senses: dict[str, list[str]] = {}
    for key, _, lemmas, _, _ in FAKE_SYNSETS:
        for lemma in lemmas:
            senses.setdefault(lemma.lower(), []).append(key)
    senses.update(SENSE_ORDER)
    index_lines = [
        f"{lemma} n {len(keys)} 1 @ {len(keys)} 0 {' '.join(f'{offsets[key]:08d}' for key in keys)}  \n"
        for lemma, keys in sorted(senses.items())
    ]
    (folder / "index.noun").write_text(LICENCE_HEADER + "".join(index_lines), encoding="utf-8")

    lexfiles = {key: lexfile for key, lexfile, *_ in FAKE_SYNSETS}
    count_lines = [
        f"{corpus.noun_sense_key(lemma, lexfiles[key], 0)} 1 {count}\n" for (lemma, key), count in TAG_COUNTS.items()
    ]
    (folder / "cntlist.rev").write_text("".join(count_lines), encoding="utf-8")
    return {key: f"{offset:08d}" for key, offset in offsets.items()}


# --------------------------------------------------------------------------------------------
# A small dictd dictionary

GERMAN_ARTICLES = {
    "tree": ["tree /tɹˈiː/\nBaum <masc> [bot.]\n      \"cut trees\"  - gefällte Bäume\n"],
    "dog": [
        "dog /dˈɒɡ/\nBock <masc>, Auflagebock <masc> [techn.]\n",
        "dog /dˈɒɡ/\nHund <masc> [zool.]\n      \"train a dog\"  - einen Hund abrichten\n"
        "      \"unleash the dogs\"  - die Hunde loslassen\n   Synonym: {dawg}\n\n see: {dogs}\n",
    ],
    "run": ["run /ɹˈʌn/ <v>\nlaufen <v, intr>\n      \"he runs\"  - er läuft\n"],
    "abandon": ["abandon /ɐbˈandən/ <v>\netw. stilllegen <v, trans>\n"],
}
_BASE64_DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _encode_dictd_number(value: int) -> str:
    digits = ""
    while True:
        digits = _BASE64_DIGITS[value % 64] + digits
        value //= 64
        if value == 0:
            return digits


def write_fake_dictionary(folder: Path, code: str, articles: dict[str, list[str]]) -> None:
    """Write freedict-eng-CODE.index and .dict.dz: headword TAB offset TAB length, base 64."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = [("00databaseinfo", "00-database-info\nAvailability:\n  GPL\n")]
    entries += [(headword, text) for headword in sorted(articles) for text in articles[headword]]
    body, index_lines = b"", []
    for headword, text in entries:
        encoded = text.encode("utf-8")
        index_lines.append(
            f"{headword}\t{_encode_dictd_number(len(body))}\t{_encode_dictd_number(len(encoded))}\n"
        )
        body += encoded
    (folder / f"freedict-eng-{code}.index").write_text("".join(index_lines), encoding="utf-8")
    with gzip.open(folder / f"freedict-eng-{code}.dict.dz", "wb") as handle:
        handle.write(body)


@pytest.fixture()
def fake_wordnet_dir(tmp_path: Path) -> Path:
    write_fake_wordnet(tmp_path / "wordnet")
    return tmp_path / "wordnet"


@pytest.fixture()
def fake_sources(tmp_path: Path) -> tuple[Path, Path]:
    write_fake_wordnet(tmp_path / "wordnet")
    write_fake_dictionary(tmp_path / "dictd", "deu", GERMAN_ARTICLES)
    return tmp_path / "wordnet", tmp_path / "dictd"


# --------------------------------------------------------------------------------------------
# WordNet parsing and labels


def test_parse_data_line_fields():
    line = (
        "09281104 17 n 02 fjord 0 fiord 0 002 @ 09313716 n 0000 ~i 09462312 n 0000 "
        "| a long narrow inlet of the sea between steep cliffs; common in Norway  \n"
    )
    synset = parse_data_line(line)
    assert synset.offset == "09281104"
    assert synset.lexfile == 17
    assert synset.lemmas == ("fjord", "fiord")
    assert synset.lex_ids == (0, 0)
    assert synset.pointers == (("@", "09313716"), ("~i", "09462312"))
    assert synset.gloss == "a long narrow inlet of the sea between steep cliffs; common in Norway"


def test_load_wordnet_reads_fake_files(fake_wordnet_dir: Path):
    wordnet = load_wordnet(fake_wordnet_dir)
    assert len(wordnet.synsets) == len(FAKE_SYNSETS)
    assert wordnet.synsets[wordnet.resolve("plant.n.02")].lemmas == ("plant", "flora")
    assert wordnet.synsets[wordnet.resolve("plant.n.01")].lemmas == ("plant", "works")
    assert wordnet.resolve("plant.n.03") is None
    assert wordnet.word_count("dog") == 20
    assert wordnet.usual_pos("dog") == "n"


def test_load_wordnet_offsets_match_byte_positions(fake_wordnet_dir: Path):
    data = (fake_wordnet_dir / "data.noun").read_bytes()
    wordnet = load_wordnet(fake_wordnet_dir)
    for offset in wordnet.synsets:
        assert data[int(offset) : int(offset) + 8].decode() == offset


def test_load_wordnet_missing_file_names_fix(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"data\.noun.*apt-get install wordnet-base"):
        load_wordnet(tmp_path)


@pytest.mark.parametrize(
    ("synset_key", "segment"),
    [
        ("tree", "plants"),  # lexicographer file noun.plant
        ("oak", "plants"),
        ("dog", "animals"),  # lexicographer file noun.animal
        ("dog_meat", "food"),  # a topic pointer to an animal names a source, not a field
        ("violin", "music"),  # hyponym of the root "musical instrument"
        ("war_drum", "military"),  # own topic pointer beats the music inherited from its hypernym
        ("tort", "law"),  # topic pointer to "law"
        ("libel", "law"),  # hyponym of a topic-labelled synset
        ("paris", "geography"),  # instance hyponym of "city", under the root "region"
        ("fjord", "geography"),
        ("plant", "plants"),  # a root itself
    ],
)
def test_label_synsets_segment(fake_wordnet_dir: Path, synset_key: str, segment: str):
    offsets = write_fake_wordnet(fake_wordnet_dir)
    labels = label_synsets(load_wordnet(fake_wordnet_dir), TEST_RULES)
    assert labels.get(offsets[synset_key]) == segment


@pytest.mark.parametrize("synset_key", ["sculpture", "code", "factory", "entity", "act"])
def test_label_synsets_leaves_out(fake_wordnet_dir: Path, synset_key: str):
    # "sculpture" is a plastic art first and a solid figure (mathematics) second, and "code"
    # has topics in two segments.
    offsets = write_fake_wordnet(fake_wordnet_dir)
    labels = label_synsets(load_wordnet(fake_wordnet_dir), TEST_RULES)
    assert offsets[synset_key] not in labels


def test_label_synsets_excluded_subtree(fake_wordnet_dir: Path):
    offsets = write_fake_wordnet(fake_wordnet_dir)
    rules = TEST_RULES + (DomainRule("economics", excluded=("wrongdoing.n.01",)),)
    labels = label_synsets(load_wordnet(fake_wordnet_dir), rules)
    assert offsets["wrongdoing"] not in labels
    assert labels[offsets["tort"]] == "law"  # own topic label wins over the exclusion above it
    assert labels[offsets["libel"]] == "law"


def test_domain_rule_rejects_unknown_segment():
    with pytest.raises(ValueError, match="DomainRule.segment must be one of"):
        DomainRule("astrology")


def test_domain_rule_rejects_unknown_lexfile():
    with pytest.raises(ValueError, match=r"unknown lexicographer files \['noun.plants'\]"):
        DomainRule("plants", ("noun.plants",))


def test_select_terms_uses_dominant_sense(fake_wordnet_dir: Path):
    wordnet = load_wordnet(fake_wordnet_dir)
    terms = select_wordnet_terms(wordnet, label_synsets(wordnet, TEST_RULES), 10, GlossCounts.from_wordnet(wordnet))
    plant_terms = [item.term for item in terms["plants"]]
    # "plant" is mostly a factory, so the organism sense does not stand for the word.
    assert "plant" not in plant_terms
    assert "flora" in plant_terms
    assert plant_terms[0] == "tree"  # the most tagged term comes first


def test_select_terms_caps_segment(fake_wordnet_dir: Path):
    wordnet = load_wordnet(fake_wordnet_dir)
    terms = select_wordnet_terms(wordnet, label_synsets(wordnet, TEST_RULES), 1)
    assert all(len(items) == 1 for items in terms.values())


# --------------------------------------------------------------------------------------------
# Definition pairs


def test_gloss_definition_before_examples():
    gloss = 'a long narrow inlet of the sea between steep cliffs; common in Norway; "the fjords of Norway"'
    assert gloss_definition(gloss) == "A long narrow inlet of the sea between steep cliffs; common in Norway."
    assert gloss_examples(gloss) == ["the fjords of Norway"]


def test_gloss_definition_drops_topic_label():
    assert gloss_definition("(computer science) a network of computers") == "A network of computers."


def test_gloss_definition_keeps_inner_capitals():
    assert gloss_definition("pH values below 7") == "pH values below 7."


def test_shorten_cuts_at_clause():
    text = "first clause with several words; " + "second clause " * 20
    shortened = shorten(text, 60)
    assert shortened == "first clause with several words"
    assert len(shorten("word " * 100, 200)) <= 200


def test_usage_example_needs_the_term():
    assert usage_example("fjord", 'an inlet; "the fjords of Norway"') == "The fjords of Norway."
    assert usage_example("dog", 'a canine; "the cat sat"') is None


@pytest.mark.parametrize(
    ("phrase", "article"),
    [("apple", "an"), ("fjord", "a"), ("unicorn", "a"), ("hour", "an"), ("European", "a"), ("oak", "an")],
)
def test_indefinite_article(phrase: str, article: str):
    assert indefinite_article(phrase) == article


def _term(wordnet, key: str, offsets: dict[str, str], term: str, segment: str) -> WordNetTerm:
    synset = wordnet.synsets[offsets[key]]
    definite = corpus.takes_definite_article(wordnet, synset, term)
    return WordNetTerm(term=term, segment=segment, synset=synset, tag_count=0, definite=definite)


def test_wordnet_examples_for_count_noun(fake_wordnet_dir: Path):
    offsets = write_fake_wordnet(fake_wordnet_dir)
    wordnet = load_wordnet(fake_wordnet_dir)
    item = _term(wordnet, "fjord", offsets, "fjord", "geography")
    examples = wordnet_examples(item, GlossCounts.from_wordnet(wordnet), random.Random(0), templates_per_term=6)
    prompts = {example.prompt for example in examples}
    assert {
        "What is a fjord?",
        "Define fjord.",
        "What does the word 'fjord' mean?",
        "Explain what a fjord is.",
    } <= prompts
    definition = "A long narrow inlet of the sea between steep cliffs; common in Norway."
    assert [example.response for example in examples[:6]] == [definition] * 6
    assert examples[-1].response == "The fjords of Norway."
    assert "fjord" in examples[-1].prompt
    assert {(example.segment, example.term, example.source) for example in examples} == {
        ("geography", "fjord", "wordnet")
    }


def test_wordnet_examples_for_names(fake_wordnet_dir: Path):
    offsets = write_fake_wordnet(fake_wordnet_dir)
    wordnet = load_wordnet(fake_wordnet_dir)
    stats = GlossCounts.from_wordnet(wordnet)
    paris = wordnet_examples(_term(wordnet, "paris", offsets, "Paris", "geography"), stats, random.Random(0), 4)
    nile = wordnet_examples(_term(wordnet, "nile", offsets, "Nile", "geography"), stats, random.Random(0), 4)
    assert "What is Paris?" in {example.prompt for example in paris}
    assert "What is the Nile?" in {example.prompt for example in nile}
    assert "What does the name 'Nile' refer to?" in {example.prompt for example in nile}


def test_wordnet_examples_possessive_name():
    synset = corpus.Synset("00000001", 9, ("Planck's_law",), (0,), (), "the basis of quantum theory")
    item = WordNetTerm(term="Planck's law", segment="physics", synset=synset, tag_count=0)
    gloss_counts = GlossCounts(tokens=Counter({"law": 100}), indefinite=Counter({"law": 50}))
    prompts = {example.prompt for example in wordnet_examples(item, gloss_counts, random.Random(0), 4)}
    assert "What is Planck's law?" in prompts
    assert not any(" a Planck" in prompt for prompt in prompts)


def test_wordnet_examples_sample_count(fake_wordnet_dir: Path):
    offsets = write_fake_wordnet(fake_wordnet_dir)
    wordnet = load_wordnet(fake_wordnet_dir)
    item = _term(wordnet, "violin", offsets, "violin", "music")
    examples = wordnet_examples(item, GlossCounts.from_wordnet(wordnet), random.Random(1), templates_per_term=2)
    assert len(examples) == 3  # two definition prompts and the usage example
    assert len({example.prompt for example in examples}) == 3


# --------------------------------------------------------------------------------------------
# FreeDict


@pytest.mark.parametrize(("text", "value"), [("A", 0), ("B", 1), ("BA", 64), ("c/", 28 * 64 + 63), ("//", 4095)])
def test_decode_dictd_number(text: str, value: int):
    assert decode_dictd_number(text) == value


def test_decode_dictd_number_rejects_invalid():
    with pytest.raises(ValueError, match=r"Invalid dictd base-64 number 'A\*'"):
        decode_dictd_number("A*")


def test_read_dictd_index_rows(tmp_path: Path):
    write_fake_dictionary(tmp_path, "deu", GERMAN_ARTICLES)
    rows = read_dictd_index(tmp_path / "freedict-eng-deu.index")
    data = gzip.open(tmp_path / "freedict-eng-deu.dict.dz").read()
    headwords = [headword for headword, _, _ in rows]
    assert headwords[0] == "00databaseinfo"
    assert headwords.count("dog") == 2
    for headword, offset, length in rows[1:]:
        assert data[offset : offset + length].decode("utf-8").startswith(headword)


def test_read_dictd_index_keep_filter(tmp_path: Path):
    write_fake_dictionary(tmp_path, "deu", GERMAN_ARTICLES)
    rows = read_dictd_index(tmp_path / "freedict-eng-deu.index", keep=lambda headword: headword == "tree")
    assert [headword for headword, _, _ in rows] == ["tree"]


def test_parse_dict_article_numbered_senses():
    article = parse_dict_article("water /wɔːtər/\n1. aquatique\n2. eau, onde\n3. abreuver, arroser\n")
    assert article.headword == "water"
    assert article.pronunciation == "wɔːtər"
    assert article.senses == ("aquatique", "eau, onde", "abreuver, arroser")
    assert choose_translations([article], "fra") == "aquatique, eau, abreuver"


def test_parse_dict_article_german_tags():
    article = parse_dict_article(GERMAN_ARTICLES["run"][0])
    assert article.headword == "run"
    assert article.head_tags == "<v>"
    assert article.part_of_speech == "v"
    assert article.example_count == 1


def test_choose_translations_prefers_main_sense():
    articles = [parse_dict_article(text) for text in GERMAN_ARTICLES["dog"]]
    assert choose_translations(articles, "deu", english_pos="n") == "der Hund"


@pytest.mark.parametrize(
    ("item", "language", "expected"),
    [
        ("Baum <masc> [bot.]", "deu", "der Baum"),
        ("Bank <fem>", "deu", "die Bank"),
        ("laufen <v, intr>", "deu", "laufen"),
        ("etw. stilllegen <v, trans>", "deu", None),
        ("chou\u2010fleur", "fra", "chou-fleur"),
        ("ne ... pas", "fra", None),
        ("1. Mai", "deu", None),
    ],
)
def test_clean_translation(item: str, language: str, expected: str | None):
    assert clean_translation(item, language) == expected


@pytest.mark.parametrize(
    ("word", "glued"),
    [("relojdepulsera", True), ("alprincipio", True), ("porque", False), ("pulsera", False), ("medio día", False)],
)
def test_is_glued(word: str, glued: bool):
    vocabulary = {"reloj", "de", "pulsera", "al", "principio", "por", "que", "medio", "día"}
    assert is_glued(word, vocabulary) is glued


# --------------------------------------------------------------------------------------------
# Splits


def test_split_for_term_ignores_case_and_spaces():
    assert split_for_term("FJORD") == split_for_term("fjord")
    assert split_for_term("  oak ") == split_for_term("Oak")
    assert split_for_term("New  York") == split_for_term("new york")


@pytest.mark.parametrize(
    ("term", "split"),
    [("fjord", "train"), ("tree", "validation"), ("dog", "validation"), ("oak", "validation"), ("tort", "train")],
)
def test_split_for_term_fixed_values(term: str, split: str):
    # A change here gives every corpus built before it different splits.
    assert split_for_term(term) == split


def test_split_for_term_fractions():
    splits = [split_for_term(f"term {index}") for index in range(5000)]
    assert 0.77 < splits.count("train") / 5000 < 0.83
    assert 0.08 < splits.count("validation") / 5000 < 0.12
    assert 0.08 < splits.count("test") / 5000 < 0.12


def test_split_for_term_rejects_bad_fractions():
    with pytest.raises(ValueError, match=r"sum to 1, got \(0.5, 0.1, 0.1\)"):
        split_for_term("fjord", (0.5, 0.1, 0.1))


def test_assign_splits_groups_term():
    terms = ["oak"] * 5 + ["Oak"]
    examples = [Example(prompt=f"q{index}", response="a", term=term) for index, term in enumerate(terms)]
    splits = {example.split for example in assign_splits(examples)}
    assert len(splits) == 1


# --------------------------------------------------------------------------------------------
# Building


def test_build_corpus_writes_disjoint_splits(fake_sources: tuple[Path, Path], tmp_path: Path):
    wordnet_dir, freedict_dir = fake_sources
    paths = build_corpus(tmp_path / "out", wordnet_dir, freedict_dir, 50, languages=("german",))
    assert set(paths) == {"train", "validation", "test", "stats"}

    terms_by_split = {}
    for split in ("train", "validation", "test"):
        records = read_jsonl(paths[split])
        assert all(set(record) == {"prompt", "response", "segment", "term", "source", "split"} for record in records)
        assert {record["split"] for record in records} <= {split}
        terms_by_split[split] = {record["term"].lower() for record in records}
    assert not terms_by_split["train"] & terms_by_split["validation"]
    assert not terms_by_split["train"] & terms_by_split["test"]
    assert not terms_by_split["validation"] & terms_by_split["test"]
    assert not list((tmp_path / "out").glob(".*.tmp"))


def test_build_corpus_stats_and_segments(fake_sources: tuple[Path, Path], tmp_path: Path):
    wordnet_dir, freedict_dir = fake_sources
    paths = build_corpus(tmp_path / "out", wordnet_dir, freedict_dir, 50, languages=("german",))
    stats = json.loads(paths["stats"].read_text(encoding="utf-8"))
    records = [record for split in ("train", "validation", "test") for record in read_jsonl(paths[split])]
    assert stats["total_pairs"] == len(records)
    for segment, entry in stats["segments"].items():
        assert entry["total_pairs"] == sum(1 for record in records if record["segment"] == segment)
    assert {"plants", "animals", "music", "law", "geography", "german"} <= set(stats["segments"])
    assert stats["licences"]["freedict-eng-deu"].startswith("GPL-3.0-or-later")

    german = {record["term"]: record["response"] for record in records if record["segment"] == "german"}
    assert german == {"tree": "der Baum", "dog": "der Hund", "run": "laufen"}  # "abandon" has no clean translation
    law = {record["term"] for record in records if record["segment"] == "law"}
    assert "tort" in law


def test_build_corpus_is_deterministic(fake_sources: tuple[Path, Path], tmp_path: Path):
    wordnet_dir, freedict_dir = fake_sources
    first = build_corpus(tmp_path / "a", wordnet_dir, freedict_dir, 50, seed=3, languages=("german",))
    second = build_corpus(tmp_path / "b", wordnet_dir, freedict_dir, 50, seed=3, languages=("german",))
    for name in ("train", "validation", "test"):
        assert first[name].read_bytes() == second[name].read_bytes()


def test_build_corpus_missing_dictionary(fake_wordnet_dir: Path, tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"freedict-eng-fra\.index.*dict-freedict-eng-fra"):
        build_corpus(tmp_path / "out", fake_wordnet_dir, tmp_path / "nowhere", languages=("french",))


def test_build_corpus_rejects_unknown_language(fake_wordnet_dir: Path, tmp_path: Path):
    with pytest.raises(ValueError, match=r"Unknown language segments \['italian'\]"):
        build_corpus(tmp_path / "out", fake_wordnet_dir, tmp_path, languages=("italian",))


# --------------------------------------------------------------------------------------------
# JSONL files


def test_write_and_read_jsonl_round_trip(tmp_path: Path):
    examples = [Example("What is a fjord?", "An inlet.", "geography", "fjord", "wordnet", "train")]
    path = write_jsonl(tmp_path / "sub" / "pairs.jsonl", examples)
    assert path.stat().st_mode & 0o777 == 0o644
    assert read_jsonl(path) == [examples[0].to_dict()]
    assert load_jsonl(path) == examples


def test_load_jsonl_defaults(tmp_path: Path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"prompt": "Hi?", "response": "Hello."}\n\n{"prompt": "P", "response": "R", "segment": "law"}\n')
    first, second = load_jsonl(path)
    assert (first.term, first.source, first.segment, first.split) == ("Hi?", "mine.jsonl", None, None)
    assert second.segment == "law"


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ('{"prompt": "P", "response": "R"}\n{"prompt": "P"}\n', r"bad\.jsonl, line 2: field 'response' is missing"),
        ('{"response": "R"}\n', r"bad\.jsonl, line 1: field 'prompt' is missing"),
        ('{"prompt": "", "response": "R"}\n', r"line 1: field 'prompt' must be a non-empty string"),
        ('{"prompt": "P", "response": 3}\n', r"line 1: field 'response' must be a non-empty string, got 3"),
        ('{"prompt": "P", "response": "R", "segment": 5}\n', r"line 1: field 'segment' must be a string or null"),
        ('{"prompt": "P", "response": "R", "split": "dev"}\n', r"line 1: field 'split' must be one of"),
        ('{"prompt": "P", "response": "R"}\n{not json}\n', r"bad\.jsonl, line 2: invalid JSON"),
        ('["P", "R"]\n', r"line 1: expected a JSON object, got list"),
    ],
)
def test_load_jsonl_errors(tmp_path: Path, lines: str, message: str):
    path = tmp_path / "bad.jsonl"
    path.write_text(lines, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_jsonl(path)


def test_load_jsonl_empty_file(tmp_path: Path):
    path = tmp_path / "test.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    assert load_jsonl(path) == []


def test_load_jsonl_missing_file(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"JSONL file not found: .*absent\.jsonl"):
        load_jsonl(tmp_path / "absent.jsonl")


def test_example_rejects_empty_response():
    with pytest.raises(ValueError, match="Example.response must be a non-empty string"):
        Example(prompt="What?", response=" ")


def test_example_term_defaults_to_prompt():
    assert Example(prompt="What?", response="That.").term == "What?"


# --------------------------------------------------------------------------------------------
# Licences


def test_source_licence_known_sources():
    assert source_licence("wordnet").startswith("WordNet 3.0 licence")
    assert "GPL-2.0-or-later" in source_licence("freedict-eng-fra")
    assert "GPL-2.0-or-later" in source_licence("freedict-eng-spa")


def test_source_licence_unknown_source():
    assert source_licence("mine.jsonl", default="CC-BY-4.0") == "CC-BY-4.0"
    with pytest.raises(ValueError, match=r"No licence is recorded for data source 'mine.jsonl'"):
        source_licence("mine.jsonl")


# --------------------------------------------------------------------------------------------
# The Debian data files, when installed

REAL_WORDNET = corpus.DEFAULT_WORDNET_DIR
REAL_FREEDICT = corpus.DEFAULT_FREEDICT_DIR
needs_real_data = pytest.mark.skipif(
    not (REAL_WORDNET / "data.noun").is_file() or not (REAL_FREEDICT / "freedict-eng-deu.index").is_file(),
    reason="wordnet-base and dict-freedict-eng-* are not installed",
)


@needs_real_data
def test_real_build_has_all_segments(tmp_path: Path):
    paths = build_corpus(tmp_path / "out", REAL_WORDNET, REAL_FREEDICT, max_terms_per_segment=20)
    stats = json.loads(paths["stats"].read_text(encoding="utf-8"))
    assert set(stats["segments"]) == set(corpus.SEGMENTS)
    assert all(entry["terms"] == 20 for entry in stats["segments"].values())


@needs_real_data
@pytest.mark.parametrize(
    ("lemma", "segment"),
    [("violin", "music"), ("tort", "law"), ("algorithm", "computing"), ("paris", "geography"), ("fjord", "geography")],
)
def test_real_labels(real_labels, lemma: str, segment: str):
    wordnet, labels = real_labels
    assert labels.get(wordnet.senses[lemma][0]) == segment


@pytest.fixture(scope="module")
def real_labels():
    wordnet = load_wordnet(REAL_WORDNET)
    return wordnet, label_synsets(wordnet)
