"""SemEval-2014 Task 4 aspect-term polarity (laptops, restaurants) from `.xml.seg` or the official XML.

Sources, in order: ``data_dir`` → a cached download from the ABSA-PyTorch mirror → a clear error
naming the files expected and the ``--data-dir`` flag. Labels: 0 negative, 1 neutral, 2 positive
(3 conflict, dropped unless ``keep_conflict``).
"""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET
from pathlib import Path

from .download import default_cache_dir, fetch

LABELS = ("negative", "neutral", "positive")
CONFLICT = 3
_SEG_POLARITY = {"-1": 0, "0": 1, "1": 2}
_XML_POLARITY = {"negative": 0, "neutral": 1, "positive": 2, "conflict": CONFLICT}
FILES = {
    "laptops": {"seg": ("Laptops_Train.xml.seg", "Laptops_Test_Gold.xml.seg"),
                "xml": ("Laptop_Train_v2.xml", "Laptops_Test_Gold.xml")},
    "restaurants": {"seg": ("Restaurants_Train.xml.seg", "Restaurants_Test_Gold.xml.seg"),
                    "xml": ("Restaurants_Train_v2.xml", "Restaurants_Test_Gold.xml")},
}
MIRRORS = ("https://raw.githubusercontent.com/songyouwei/ABSA-PyTorch/master/datasets/semeval14",)


@dataclasses.dataclass(frozen=True)
class AspectExample:
    """One (sentence, aspect) pair; ``sentence`` has the aspect term in place."""

    sentence: str
    aspect: str
    label: int
    origin: str  # file:line, for error messages and inspection


def read_seg(path: str | Path, keep_conflict: bool = False) -> list[AspectExample]:
    """ABSA-PyTorch's 3-line format: sentence with $T$, aspect, polarity -1/0/1."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # a byte-order mark is not part of line 1
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte {err.object[err.start]:#x} at offset {err.start}); "
                         f"save the file as UTF-8") from None
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ValueError(f"{path} is empty: expected lines of sentence (with $T$), aspect, polarity")
    if len(lines) % 3:
        raise ValueError(f"{path}: {len(lines)} lines is not a multiple of 3 (sentence, aspect, polarity)")
    examples = []
    for i in range(0, len(lines), 3):
        template, aspect, polarity = (line.strip() for line in lines[i:i + 3])
        if "$T$" not in template:
            raise ValueError(f"{path}:{i + 1}: sentence has no $T$ placeholder: {template[:80]!r}")
        if not aspect:
            raise ValueError(f"{path}:{i + 2}: empty aspect term")
        if polarity not in _SEG_POLARITY:
            raise ValueError(f"{path}:{i + 3}: polarity must be -1, 0 or 1, got {polarity!r}")
        examples.append(AspectExample(template.replace("$T$", aspect), aspect, _SEG_POLARITY[polarity],
                                      f"{path.name}:{i + 1}"))
    return examples


def read_xml(path: str | Path, keep_conflict: bool = False) -> list[AspectExample]:
    """The official SemEval XML: <sentence><text/><aspectTerms><aspectTerm term polarity from to/>."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        line, column = err.position
        raise ValueError(f"{path}:{line}: malformed XML at column {column} ({err})") from None
    examples = []
    for sentence in root.iter("sentence"):
        text = sentence.findtext("text")
        where = f"{path.name} sentence id={sentence.get('id')}"
        if text is None:
            raise ValueError(f"{path}: {where} has no <text>")
        for term in sentence.iter("aspectTerm"):
            polarity = term.get("polarity")
            if polarity not in _XML_POLARITY:
                raise ValueError(f"{path}: {where}: unknown polarity {polarity!r}")
            label = _XML_POLARITY[polarity]
            if label == CONFLICT and not keep_conflict:
                continue
            examples.append(AspectExample(text.strip(), term.get("term", "").strip(), label, where))
    if not examples:
        raise ValueError(f"{path} holds no aspect terms with a polarity")
    return examples


def _local(folder: Path, domain: str) -> tuple[Path, Path, str] | None:
    for fmt in ("seg", "xml"):
        train, test = (folder / name for name in FILES[domain][fmt])
        if train.exists() and test.exists():
            return train, test, fmt
    return None


def _expected(domain: str) -> str:
    seg, xml = FILES[domain]["seg"], FILES[domain]["xml"]
    return f"{' + '.join(seg)} (ABSA-PyTorch .xml.seg) or {' + '.join(xml)} (official XML)"


def load_semeval(domain: str = "laptops", data_dir: str | Path | None = None, keep_conflict: bool = False,
                 cache_dir: Path | None = None, download: bool = True, log=print) -> dict[str, list[AspectExample]]:
    """{'train': [...], 'test': [...]} for ``domain`` ('laptops' or 'restaurants')."""
    if domain not in FILES:
        raise ValueError(f"unknown SemEval-2014 domain {domain!r}; choose from {sorted(FILES)}")
    if data_dir is not None:
        found = _local(Path(data_dir), domain)
        if found is None:
            raise FileNotFoundError(f"{data_dir} does not hold the SemEval-2014 {domain} files: expected {_expected(domain)}")
    else:
        cache_dir = cache_dir or default_cache_dir("semeval14")
        found = _local(cache_dir, domain)
        if found is None and download:
            try:
                for name in FILES[domain]["seg"]:
                    fetch(name, MIRRORS, cache_dir)
                found = _local(cache_dir, domain)
            except OSError as err:
                raise FileNotFoundError(
                    f"SemEval-2014 {domain} data not found and the download failed ({str(err).splitlines()[-1].strip()}). "
                    f"Pass --data-dir DIR with {_expected(domain)}.") from None
        if found is None:
            raise FileNotFoundError(f"SemEval-2014 {domain} data not found: pass --data-dir DIR with {_expected(domain)}")
    train, test, fmt = found
    read = read_seg if fmt == "seg" else read_xml
    log(f"SemEval-2014 {domain}: {train} + {test}")
    return {"train": read(train, keep_conflict), "test": read(test, keep_conflict)}
