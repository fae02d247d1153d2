"""A deterministic English training corpus built only from Debian packages.

Sources (both public-domain texts):

* ``sword-text-web``: the World English Bible as a SWORD zText module (OSIS markup). Read with
  a small pure-Python zText reader; verse text is kept, footnotes, cross references, book
  introductions, section headings and the front/back matter are dropped. Each chapter becomes
  one paragraph under a heading line such as ``Genesis 1`` (``Psalm 23`` for psalms).
* ``r-cran-janeaustenr``: Jane Austen's six novels. The ``.deb`` is fetched with
  ``apt-get download`` and unpacked with ``dpkg-deb -x``; its data live in R's lazy-load
  database (``data/Rdata.rdb`` + ``Rdata.rdx``), whose records are decoded with the PyPI package
  ``rdata`` (so R itself is not needed). Lines are joined into paragraphs at blank lines.

Held out (never in train.txt): the novel *Persuasion* and the Gospel of John.

Requirements: Debian/Ubuntu with ``apt-get``/``dpkg-deb`` (installing ``sword-text-web`` needs
root; ``scripts/build_corpus.sh`` does it) and ``pip install rdata`` in the running Python.

``python -m models.corpus OUT_DIR`` writes ``train.txt``, ``heldout.txt`` and ``manifest.json``;
the same package versions give the same bytes on every run.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import unicodedata
import urllib.parse
import warnings
import zlib
from pathlib import Path

BIBLE_PACKAGE = "sword-text-web"
AUSTEN_PACKAGE = "r-cran-janeaustenr"
SWORD_ROOT = Path("/usr/share/sword")
SWORD_MODULE = "engWEB2015eb"
SWORD_DATA = SWORD_ROOT / "modules/texts/ztext" / SWORD_MODULE
SWORD_CONF = SWORD_ROOT / "mods.d" / f"{SWORD_MODULE}.conf"

HELDOUT_BOOKS = ("John",)          # OSIS book ids
HELDOUT_NOVELS = ("persuasion",)   # janeaustenr object names
# Publication order.
NOVELS = (
    ("sensesensibility", "Sense and Sensibility"),
    ("prideprejudice", "Pride and Prejudice"),
    ("mansfieldpark", "Mansfield Park"),
    ("emma", "Emma"),
    ("northangerabbey", "Northanger Abbey"),
    ("persuasion", "Persuasion"),
)
SETUP_HINT = "run scripts/build_corpus.sh (as root) to install the corpus sources"


class CorpusSourceError(RuntimeError):
    """A source package or the rdata library is missing and cannot be installed here."""


# --------------------------------------------------------------------------- helpers

def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C")
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _require_rdata():
    try:
        import rdata  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise CorpusSourceError(
            f"the PyPI package 'rdata' is required to read {AUSTEN_PACKAGE}'s R data: "
            f"`{sys.executable} -m pip install rdata`, or {SETUP_HINT}") from exc
    return rdata


def _dpkg_version(package: str) -> str | None:
    if shutil.which("dpkg-query") is None:
        return None
    res = _run(["dpkg-query", "-W", "-f=${Status}\t${Version}", package])
    if res.returncode != 0 or "install ok installed" not in res.stdout:
        return None
    return res.stdout.split("\t", 1)[1].strip()


def _apt(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run apt-get; on failure run `apt-get update` once (as root) and retry."""
    res = _run(["apt-get", *args], cwd=cwd)
    if res.returncode != 0 and _is_root():
        _run(["apt-get", "update"])
        res = _run(["apt-get", *args], cwd=cwd)
    return res


def ensure_bible_package() -> str:
    """Make sure sword-text-web is installed (installing it as root); return its version."""
    version = _dpkg_version(BIBLE_PACKAGE)
    if version is None or not SWORD_DATA.is_dir():
        if not _is_root() or shutil.which("apt-get") is None:
            raise CorpusSourceError(f"Debian package {BIBLE_PACKAGE} is not installed "
                                    f"({SWORD_DATA} missing); {SETUP_HINT}")
        res = _apt(["install", "-y", "--no-install-recommends", BIBLE_PACKAGE])
        version = _dpkg_version(BIBLE_PACKAGE)
        if res.returncode != 0 or version is None or not SWORD_DATA.is_dir():
            raise CorpusSourceError(f"apt-get install {BIBLE_PACKAGE} failed:\n{res.stderr[-2000:]}")
    return version


def download_deb(package: str, dest: Path) -> Path:
    """`apt-get download` one package's .deb into dest (no root needed once lists exist)."""
    if shutil.which("apt-get") is None:
        raise CorpusSourceError(f"apt-get is needed to download {package}; {SETUP_HINT}")
    dest.mkdir(parents=True, exist_ok=True)
    res = _apt(["download", package], cwd=dest)
    debs = sorted(dest.glob(f"{package}_*.deb"))
    if res.returncode != 0 or len(debs) != 1:
        raise CorpusSourceError(f"apt-get download {package} failed ({SETUP_HINT}):\n"
                                f"{res.stderr[-2000:]}")
    return debs[0]


def _deb_version(deb: Path) -> str:
    # name_version_arch.deb, with ':' (epoch) url-encoded as %3a
    return urllib.parse.unquote(deb.name.split("_")[1])


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- SWORD zText

def read_ztext_entries(module_dir: Path = SWORD_DATA) -> list[str]:
    """All verse-index entries of a zText module, OT then NT, in canonical order.

    Per testament: ``*.bzs`` = blocks (uint32 LE offset, compressed size, uncompressed size),
    ``*.bzz`` = the zlib-compressed blocks, ``*.bzv`` = entries (uint32 block, uint32 offset in
    the uncompressed block, uint16 size). Entries include module/testament/book/chapter
    headings as well as verses; empty entries come back as "".
    """
    entries: list[str] = []
    for testament in ("ot", "nt"):
        bzs = (module_dir / f"{testament}.bzs").read_bytes()
        bzv = (module_dir / f"{testament}.bzv").read_bytes()
        bzz = (module_dir / f"{testament}.bzz").read_bytes()
        blocks: list[bytes] = []
        for off, size, usize in struct.iter_unpack("<III", bzs):
            data = zlib.decompress(bzz[off:off + size]) if size else b""
            if len(data) != usize:
                raise ValueError(f"{testament}.bzz: block size {len(data)} != index {usize}")
            blocks.append(data)
        for block, off, size in struct.iter_unpack("<IIH", bzv):
            entries.append(blocks[block][off:off + size].decode("utf-8") if size else "")
    return entries


_TOKEN = re.compile(r"<(/?)([\w:]+)([^>]*)>|([^<]+)")
_ATTR = re.compile(r"([\w:]+)\s*=\s*(?:\"([^\"]*)\"|'([^']*)')")
_INLINE = re.compile(r"</?(?:w|q|transChange|hi|foreign|seg|name)\b[^>]*>")
_ATTR_TAGS = {"div", "milestone", "chapter", "title"}
# Elements whose content is not verse text.
_SKIP = {"note", "speaker", "rdg", "catchWord", "figure", "index"}
# Elements that separate words (a space is emitted for them); others (w, q, ...) are inline.
_BREAK = {"l", "lb", "lg", "p", "div", "chapter", "title", "item", "list", "speaker", "verse",
          "milestone", "head", "table", "row", "cell"}
_NOTE = "\x00"  # where a footnote was: a space unless next to whitespace or closing punctuation
_CLOSING = ".,;:!?’”)]—"
# Fallback English names for OSIS book ids, for a book whose x-usfm-h milestone is missing.
OSIS_NAMES = dict(item.split("=") for raw in (
    "Gen=Genesis Exod=Exodus Lev=Leviticus Num=Numbers Deut=Deuteronomy Josh=Joshua "
    "Judg=Judges Ruth=Ruth 1Sam=1_Samuel 2Sam=2_Samuel 1Kgs=1_Kings 2Kgs=2_Kings "
    "1Chr=1_Chronicles 2Chr=2_Chronicles Ezra=Ezra Neh=Nehemiah Esth=Esther Job=Job Ps=Psalms "
    "Prov=Proverbs Eccl=Ecclesiastes Song=Song_of_Solomon Isa=Isaiah Jer=Jeremiah "
    "Lam=Lamentations Ezek=Ezekiel Dan=Daniel Hos=Hosea Joel=Joel Amos=Amos Obad=Obadiah "
    "Jonah=Jonah Mic=Micah Nah=Nahum Hab=Habakkuk Zeph=Zephaniah Hag=Haggai Zech=Zechariah "
    "Mal=Malachi Tob=Tobit Jdt=Judith EsthGr=Esther_(Greek) AddEsth=Additions_to_Esther "
    "Wis=Wisdom_of_Solomon Sir=Sirach Bar=Baruch EpJer=Letter_of_Jeremiah "
    "DanGr=Daniel_(Greek) PrAzar=Prayer_of_Azariah Sus=Susanna Bel=Bel_and_the_Dragon "
    "1Macc=1_Maccabees 2Macc=2_Maccabees 3Macc=3_Maccabees 4Macc=4_Maccabees 1Esd=1_Esdras "
    "2Esd=2_Esdras PrMan=Prayer_of_Manasses AddPs=Psalm_151 Matt=Matthew Mark=Mark Luke=Luke "
    "John=John Acts=Acts Rom=Romans 1Cor=1_Corinthians 2Cor=2_Corinthians Gal=Galatians "
    "Eph=Ephesians Phil=Philippians Col=Colossians 1Thess=1_Thessalonians "
    "2Thess=2_Thessalonians 1Tim=1_Timothy 2Tim=2_Timothy Titus=Titus Phlm=Philemon "
    "Heb=Hebrews Jas=James 1Pet=1_Peter 2Pet=2_Peter 1John=1_John 2John=2_John 3John=3_John "
    "Jude=Jude Rev=Revelation").split() for item in [raw.replace("_", " ")])


def _attrs(text: str) -> dict[str, str]:
    return {m.group(1): m.group(2) if m.group(2) is not None else m.group(3)
            for m in _ATTR.finditer(text)}


def _clean_verse_text(text: str) -> str:
    text = html.unescape(text)
    text = re.sub(r"\s+", " ", text)
    # Footnote markers: drop those next to whitespace/closing punctuation, else a space.
    text = re.sub(f" ?{_NOTE}+ ?(?=[{re.escape(_CLOSING)}])", "", text)
    text = re.sub(f"(?:(?<= )|^){_NOTE}+|{_NOTE}+(?=[ {re.escape(_CLOSING)}]|$)", "", text)
    text = text.replace(_NOTE, " ")
    return re.sub(" +", " ", text).strip()


def parse_osis_bible(entries: list[str]) -> list[dict]:
    """Group OSIS entries into books and chapters of plain text.

    Returns ``[{"osis": "Gen", "name": "Genesis", "chapters": [(heading, text), ...]}, ...]``.
    Only text inside a ``<chapter sID>``..``<chapter eID>`` pair is kept. A chapter's osisID
    decides its book (a book start tag can be missing: in sword-text-web 426.0 Hosea's was lost
    when osis2mod folded Greek Daniel, absent from NRSVA, into Hosea's introduction). Book names
    come from the book's ``x-usfm-h`` milestone (else OSIS_NAMES), chapter headings from
    ``x-chapterLabel`` when present (``Psalm 23``), else ``<book name> <n>``.
    """
    books: list[dict] = []
    book: dict | None = None
    chapter: dict | None = None  # {"n", "label", "parts"}

    def new_book(osis: str) -> dict:
        b = {"osis": osis, "name": OSIS_NAMES.get(osis, osis), "chapters": [], "named": False}
        books.append(b)
        return b

    def close_chapter():
        nonlocal chapter
        if chapter is not None and book is not None:
            text = _clean_verse_text("".join(chapter["parts"]))
            if text:
                heading = chapter["label"] or f"{book['name']} {chapter['n']}"
                book["chapters"].append((heading, text))
        chapter = None

    for entry in entries:
        if not entry:
            continue
        skip_stack: list[str] = []  # open elements inside a skipped one
        entry = _INLINE.sub("", entry)  # most tags are <w lemma=..>word</w>: drop them first
        for closing, name, rest, text in _TOKEN.findall(entry):
            if text:
                if chapter is not None and not skip_stack:
                    chapter["parts"].append(text)
                continue
            selfclosing = rest.endswith("/")
            if skip_stack:
                if closing:
                    if skip_stack[-1] == name:
                        skip_stack.pop()
                    if not skip_stack and chapter is not None:
                        chapter["parts"].append(_NOTE if name == "note" else " ")
                elif not selfclosing:
                    skip_stack.append(name)
                continue
            attrs = _attrs(rest) if name in _ATTR_TAGS and not closing else {}
            if name == "div" and attrs.get("type") == "book":
                close_chapter()
                if "sID" in attrs:
                    book = new_book(attrs.get("osisID", ""))
                elif "eID" in attrs:
                    book = None
                continue
            if name == "milestone":
                mtype = attrs.get("type")
                if mtype == "x-usfm-h" and book is not None and not book["named"] \
                        and chapter is None and not book["chapters"]:
                    book["name"], book["named"] = attrs.get("n", book["name"]).strip(), True
                elif mtype == "x-chapterLabel" and chapter is not None:
                    chapter["label"] = attrs.get("n", "").strip() or None
                if chapter is not None:
                    chapter["parts"].append(" ")
                continue
            if name == "chapter":
                close_chapter()
                if "sID" in attrs:
                    osis = attrs.get("osisID") or attrs["sID"]
                    book_id, _, num = osis.rpartition(".")
                    if book is None or (book_id and book_id != book["osis"]):
                        book = new_book(book_id or (book["osis"] if book else ""))
                    chapter = {"n": attrs.get("n") or num, "label": None, "parts": []}
                continue
            if chapter is None:
                continue
            skip = name in _SKIP or (name == "title" and attrs.get("canonical") != "true")
            if skip and not closing and not selfclosing:
                skip_stack.append(name)
                if name != "note":
                    chapter["parts"].append(" ")
                continue
            if name in _BREAK:
                chapter["parts"].append(" ")
    close_chapter()
    for b in books:
        del b["named"]
    return [b for b in books if b["chapters"]]


def _sword_conf() -> dict[str, str]:
    conf: dict[str, str] = {}
    paths = [SWORD_CONF] + sorted(p for p in SWORD_CONF.parent.glob("*.conf")
                                  if p.name.lower() == SWORD_CONF.name.lower())
    path = next((p for p in paths if p.is_file()), None)
    if path is not None:
        for line in path.read_text(encoding="utf-8").splitlines():
            if "=" in line and not line.startswith("#"):
                key, value = line.split("=", 1)
                conf.setdefault(key.strip(), value.strip())
    return conf


# --------------------------------------------------------------------------- R lazy-load DB

def read_r_lazyload_db(base: Path) -> dict:
    """Objects of an R lazy-load database ``base.rdx`` + ``base.rdb`` (e.g. ``data/Rdata``).

    The .rdx is an RDS list ``variables = {name: c(offset, length)}``; each .rdb record is a
    4-byte big-endian uncompressed length followed by the compressed serialization (zlib for
    ``compressed = TRUE``; for types 2/3 a type byte 'Z', '2', 'X' or '0' comes first).
    """
    rdata = _require_rdata()
    import bz2
    import lzma

    def parse(raw: bytes):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return rdata.conversion.convert(rdata.parser.parse_data(raw, extension=".rds"))

    index = rdata.read_rds(str(base.with_suffix(".rdx")))
    compressed = index.get("compressed", [True])
    ctype = int(compressed[0]) if len(compressed) else 1
    db = base.with_suffix(".rdb").read_bytes()
    out = {}
    for name in sorted(index["variables"]):
        off, length = (int(v) for v in index["variables"][name])
        rec = db[off:off + length]
        ulen = struct.unpack(">I", rec[:4])[0]
        if ctype in (2, 3):
            kind, payload = rec[4:5], rec[5:]
            raw = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress,
                   b"0": bytes}[kind](payload)
        else:
            raw = zlib.decompress(rec[4:])
        if len(raw) != ulen:
            raise ValueError(f"{base}.rdb[{name}]: {len(raw)} bytes != recorded {ulen}")
        out[str(name)] = parse(raw)
    return out


def lines_to_paragraphs(lines) -> list[str]:
    """Join non-blank lines into paragraphs; blank lines (or NA) separate paragraphs."""
    paras, cur = [], []
    for line in lines:
        line = line.strip() if isinstance(line, str) else ""
        if line:
            cur.append(line)
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    return [re.sub(r"\s+", " ", p) for p in paras]


def load_austen(deb: Path, workdir: Path) -> dict[str, list[str]]:
    """Unpack the janeaustenr .deb and return {novel object name: lines}."""
    root = workdir / "deb"
    res = _run(["dpkg-deb", "-x", str(deb), str(root)])
    if res.returncode != 0:
        raise CorpusSourceError(f"dpkg-deb -x {deb.name} failed:\n{res.stderr[-2000:]}")
    data_dirs = sorted(root.glob("usr/lib/R/site-library/janeaustenr/data"))
    if not data_dirs:
        raise CorpusSourceError(f"{deb.name}: no janeaustenr/data directory")
    data = data_dirs[0]
    objects: dict = {}
    if (data / "Rdata.rdx").is_file():
        objects = read_r_lazyload_db(data / "Rdata")
    else:  # plain .rda files (packages built without LazyData)
        rdata = _require_rdata()
        for f in sorted(list(data.glob("*.rda")) + list(data.glob("*.RData"))):
            objects.update(rdata.read_rda(str(f)))
    missing = [n for n, _ in NOVELS if n not in objects]
    if missing:
        raise CorpusSourceError(f"{deb.name}: novels missing from its data: {missing}")
    return {n: [str(x) if isinstance(x, str) else "" for x in list(objects[n])]
            for n, _ in NOVELS}


# --------------------------------------------------------------------------- text assembly

def normalize_text(text: str) -> str:
    """NFC, \\r\\n -> \\n, no trailing spaces, at most two blank lines in a row, one final \\n."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{4,}", "\n\n\n", text)
    return text.strip("\n") + "\n"


def _bible_doc(book: dict) -> str:
    return "\n\n".join(f"{heading}\n{text}" for heading, text in book["chapters"])


def _novel_doc(paragraphs: list[str]) -> str:
    return "\n\n".join(paragraphs)


def _file_stats(data: bytes) -> dict:
    text = data.decode("utf-8")
    return {"bytes": len(data), "chars": len(text), "lines": text.count("\n"),
            "words": len(text.split()), "sha256": _sha256_bytes(data)}


def build_corpus(out_dir: Path) -> dict:
    """Build train.txt, heldout.txt and manifest.json in out_dir; return the manifest."""
    out_dir = Path(out_dir)
    _require_rdata()
    import rdata

    bible_version = ensure_bible_package()
    conf = _sword_conf()
    books = parse_osis_bible(read_ztext_entries(SWORD_DATA))
    osis_ids = [b["osis"] for b in books]
    for held in HELDOUT_BOOKS:
        if held not in osis_ids:
            raise CorpusSourceError(f"held-out book {held} not found in {SWORD_MODULE}")

    with tempfile.TemporaryDirectory(prefix="bitskip-corpus-") as tmp:
        tmpdir = Path(tmp)
        deb = download_deb(AUSTEN_PACKAGE, tmpdir / "debs")
        deb_sha = _sha256_bytes(deb.read_bytes())
        deb_name, austen_version = deb.name, _deb_version(deb)
        novels = load_austen(deb, tmpdir)

    splits: dict[str, list[tuple[str, str, str]]] = {"train": [], "heldout": []}
    for b in books:
        split = "heldout" if b["osis"] in HELDOUT_BOOKS else "train"
        splits[split].append(("bible", b["name"], _bible_doc(b)))
    for key, title in NOVELS:
        split = "heldout" if key in HELDOUT_NOVELS else "train"
        splits[split].append(("austen", title, _novel_doc(lines_to_paragraphs(novels[key]))))

    out_dir.mkdir(parents=True, exist_ok=True)
    manifest: dict = {
        "format": "bitskip-corpus/1",
        "builder": "models/corpus.py (python -m models.corpus OUT_DIR)",
        "normalization": "NFC; \\r\\n -> \\n; trailing spaces stripped; at most 2 blank lines "
                         "in a row; documents separated by one blank line; UTF-8, final newline",
        "sources": [
            {"id": "bible", "package": BIBLE_PACKAGE, "version": bible_version,
             "version_from": "dpkg-query -W", "module": SWORD_MODULE,
             "module_version": conf.get("Version"), "versification": conf.get("Versification"),
             "title": "World English Bible (with Deuterocanon)",
             "license": "Public Domain",
             "license_note": conf.get("CopyrightNotes", "")
             or "The World English Bible is in the public domain.",
             "extraction": "verse text of every chapter (one paragraph per chapter under a "
                           "'Book N' heading); footnotes, cross references, section headings, "
                           "book introductions, preface and glossary removed"},
            {"id": "austen", "package": AUSTEN_PACKAGE, "version": austen_version,
             "version_from": "apt-get download file name", "deb": deb_name, "deb_sha256": deb_sha,
             "title": "Jane Austen's six completed novels",
             "license": "Public Domain (texts; Austen died 1817)",
             "license_note": "The R packaging (janeaustenr, Julia Silge) is MIT-licensed; the "
                             "novel texts themselves are in the public domain.",
             "reader": f"rdata {getattr(rdata, '__version__', '?')} (R lazy-load DB "
                       "data/Rdata.rdb/.rdx)",
             "extraction": "lines joined into paragraphs at blank lines"},
        ],
        "heldout": {"bible_books": list(HELDOUT_BOOKS),
                    "novels": [t for k, t in NOVELS if k in HELDOUT_NOVELS]},
        "splits": {},
    }
    for split, docs in splits.items():
        text = normalize_text("\n\n".join(doc for _, _, doc in docs))
        data = text.encode("utf-8")
        (out_dir / f"{split}.txt").write_bytes(data)
        manifest["splits"][split] = {
            "file": f"{split}.txt", **_file_stats(data),
            "documents": [{"source": src, "title": title,
                           "chars": len(normalize_text(doc)) - 1} for src, title, doc in docs],
        }
    (out_dir / "manifest.json").write_text(
        json.dumps(manifest, indent=2, ensure_ascii=False, sort_keys=False) + "\n",
        encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m models.corpus",
        description="Build the deterministic WEB Bible + Jane Austen corpus from Debian packages.")
    parser.add_argument("out_dir", type=Path, help="output directory (e.g. data/corpus)")
    args = parser.parse_args(argv)
    try:
        manifest = build_corpus(args.out_dir)
    except CorpusSourceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['chars']:,} chars, {info['bytes'] / 1e6:.2f} MB, "
              f"{info['lines']:,} lines, sha256 {info['sha256']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
