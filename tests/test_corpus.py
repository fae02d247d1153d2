"""The training corpus (models/corpus.py): reproducible bytes, a clean held-out split, English.

Needs the Debian package sword-text-web, `apt-get download` access for r-cran-janeaustenr and
the PyPI package rdata; when they are missing the tests fail in CI (which installs them) and
skip elsewhere, saying to run scripts/build_corpus.sh.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
import unicodedata
from collections import Counter

import pytest

from conftest import require_system
from models import corpus

SETUP = "run scripts/build_corpus.sh (as root) to install the corpus sources"


def _missing_sources() -> list[str]:
    missing = []
    if not corpus.SWORD_DATA.is_dir():
        missing.append(f"Debian package {corpus.BIBLE_PACKAGE} ({corpus.SWORD_DATA})")
    if importlib.util.find_spec("rdata") is None:
        missing.append("PyPI package rdata")
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            missing.append(f"the {tool} command")
    return missing


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """The corpus built twice, into two fresh directories: [(dir, manifest), (dir, manifest)]."""
    missing = _missing_sources()
    if missing:
        require_system(f"corpus sources ({', '.join(missing)})", SETUP)
    out = []
    for name in ("first", "second"):
        d = tmp_path_factory.mktemp(f"corpus-{name}")
        try:
            manifest = corpus.build_corpus(d)
        except corpus.CorpusSourceError as exc:
            require_system(f"a corpus source ({exc})", SETUP)
        out.append((d, manifest))
    return out


@pytest.fixture(scope="module")
def texts(builds):
    d, _ = builds[0]
    return {split: (d / f"{split}.txt").read_text(encoding="utf-8")
            for split in ("train", "heldout")}


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_build_is_deterministic_and_matches_manifest(builds):
    (d1, m1), (d2, m2) = builds
    for split in ("train", "heldout"):
        h1, h2 = _sha256(d1 / f"{split}.txt"), _sha256(d2 / f"{split}.txt")
        assert h1 == h2, f"{split}.txt differs between two builds"
        assert m1["splits"][split]["sha256"] == h1
        data = (d1 / f"{split}.txt").read_bytes()
        assert m1["splits"][split]["bytes"] == len(data)
        assert m1["splits"][split]["chars"] == len(data.decode("utf-8"))
        assert m1["splits"][split]["lines"] == data.count(b"\n")
    assert (d1 / "manifest.json").read_bytes() == (d2 / "manifest.json").read_bytes()
    assert json.loads((d1 / "manifest.json").read_text(encoding="utf-8")) == m1


def test_manifest_names_sources_versions_and_licenses(builds):
    _, manifest = builds[0]
    sources = {s["package"]: s for s in manifest["sources"]}
    assert set(sources) == {"sword-text-web", "r-cran-janeaustenr"}
    for src in sources.values():
        assert re.match(r"^[\w.:+~-]+$", src["version"]), src
        assert "Public Domain" in src["license"]
    assert sources["r-cran-janeaustenr"]["deb"].endswith(".deb")
    assert manifest["heldout"] == {"bible_books": ["John"], "novels": ["Persuasion"]}
    held = [d["title"] for d in manifest["splits"]["heldout"]["documents"]]
    train = [d["title"] for d in manifest["splits"]["train"]["documents"]]
    assert held == ["John", "Persuasion"]
    assert "John" not in train and "Persuasion" not in train
    assert {"Genesis", "Psalms", "Revelation", "1 John", "Emma", "Pride and Prejudice"} <= set(train)


def test_heldout_book_and_novel_never_in_train(texts):
    train, held = texts["train"], texts["heldout"]
    persuasion = ("Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who, for his "
                  "own amusement, never took up any book but the Baronetage")
    john = "In the beginning was the Word, and the Word was with God"
    for sentence in (persuasion, john):
        assert sentence in held
        assert sentence not in train
    assert "Kellynch" not in train and "Sir Walter Elliot" not in train
    train_lines, held_lines = set(train.split("\n")), set(held.split("\n"))
    assert "John 1" in held_lines and "John 21" in held_lines
    assert "John 1" not in train_lines
    assert "1 John 1" in train_lines  # the letters of John stay in train
    # Bible text is clean: markup and footnotes gone, chapters with heading lines.
    assert "Genesis 1\nIn the beginning, God created the heavens and the earth." in train
    assert "Psalm 23\n" in train and "Hosea 14\n" in train
    assert "<" not in train and "strong:" not in train and "\x00" not in train


def test_corpus_is_normalized_english_of_expected_size(builds, texts):
    _, manifest = builds[0]
    assert manifest["splits"]["train"]["bytes"] > 5_000_000
    assert 300_000 < manifest["splits"]["heldout"]["bytes"] < 1_500_000
    for split, text in texts.items():
        assert unicodedata.is_normalized("NFC", text)
        assert "\r" not in text and "\t" not in text
        assert "\n\n\n\n" not in text
        assert not re.search(r"[ \t]$", text, flags=re.M)
        assert text.endswith("\n") and not text.endswith("\n\n")
        letters = sum(c.isascii() and (c.isalpha() or c.isspace()) for c in text)
        assert letters / len(text) > 0.9, split
        words = re.findall(r"[a-z]+", text.lower())
        top = {w for w, _ in Counter(words).most_common(10)}
        assert {"the", "and", "of", "to"} <= top, (split, top)
