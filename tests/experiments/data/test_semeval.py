"""SemEval-2014 loaders: the shared laptops split, official XML, the .xml.seg format, clear errors on bad files."""

import numpy as np
import pytest

from experiments.data import semeval
from experiments.data.semeval import load_semeval, read_seg, read_xml
from tests.helpers import SHARED_DATA

SEMEVAL = SHARED_DATA / "semeval14"

XML = """<?xml version="1.0" encoding="UTF-8"?>
<sentences>
  <sentence id="1"><text>The battery life is amazing but the camera is terrible.</text>
    <aspectTerms>
      <aspectTerm term="battery life" polarity="positive" from="4" to="16"/>
      <aspectTerm term="camera" polarity="negative" from="36" to="42"/>
    </aspectTerms></sentence>
  <sentence id="2"><text>Screen is fine, speakers are so-so.</text>
    <aspectTerms><aspectTerm term="Screen" polarity="conflict" from="0" to="6"/>
    <aspectTerm term="speakers" polarity="neutral" from="16" to="24"/></aspectTerms></sentence>
  <sentence id="3"><text>No aspects here.</text></sentence>
</sentences>
"""


@pytest.mark.skipif(not SEMEVAL.exists(), reason="shared SemEval data not present")
def test_shared_laptops_split_loads_with_expected_counts():
    data = load_semeval("laptops", SEMEVAL, log=lambda *_: None)
    assert len(data["train"]) == 2328 and len(data["test"]) == 638
    assert np.bincount([e.label for e in data["train"]]).tolist() == [870, 464, 994]
    first = data["train"][0]
    assert first.aspect == "cord" and "$T$" not in first.sentence and "cord" in first.sentence and first.label == 1


def test_official_xml_drops_conflict_unless_asked(tmp_path):
    path = tmp_path / "Laptop_Train_v2.xml"
    path.write_text(XML)
    examples = read_xml(path)
    assert [(e.aspect, e.label) for e in examples] == [("battery life", 2), ("camera", 0), ("speakers", 1)]
    assert [e.label for e in read_xml(path, keep_conflict=True)] == [2, 0, 3, 1]


def test_malformed_files_name_file_and_line(tmp_path):
    seg = tmp_path / "Laptops_Train.xml.seg"
    seg.write_text("good $T$ here\nscreen\n1\nbad sentence without placeholder\nscreen\n1\n")
    with pytest.raises(ValueError, match=r"Laptops_Train\.xml\.seg:4: sentence has no \$T\$"):
        read_seg(seg)
    seg.write_text("good $T$ here\nscreen\n2\n")
    with pytest.raises(ValueError, match=r"Laptops_Train\.xml\.seg:3: polarity must be -1, 0 or 1, got '2'"):
        read_seg(seg)
    seg.write_text("good $T$ here\nscreen\n")
    with pytest.raises(ValueError, match="not a multiple of 3"):
        read_seg(seg)
    bad = tmp_path / "bad.xml"
    bad.write_text("<sentences>\n<sentence id='1'><text>x</text>\n</sentences>\n")
    with pytest.raises(ValueError, match=r"bad\.xml:3: malformed XML"):
        read_xml(bad)


def test_missing_data_offline_names_files_and_flag(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"does not hold the SemEval-2014 laptops files: expected "
                                                r"Laptops_Train\.xml\.seg \+ Laptops_Test_Gold\.xml\.seg"):
        load_semeval("laptops", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"data not found: pass --data-dir DIR with Laptops_Train\.xml\.seg"):
        load_semeval("laptops", cache_dir=tmp_path / "empty", download=False)

    def offline(*args, **kwargs):
        raise OSError("could not download Laptops_Train.xml.seg:\n  mirror: URLError: no network")

    monkeypatch.setattr(semeval, "fetch", offline)
    with pytest.raises(FileNotFoundError, match=r"download failed \(mirror: URLError: no network\)\. Pass --data-dir"):
        load_semeval("laptops", cache_dir=tmp_path / "cache")


def test_non_utf8_and_empty_files_are_named(tmp_path):
    seg = tmp_path / "Laptops_Train.xml.seg"
    seg.write_bytes(b"good $T$ here\nscreen\n1\n\xff\xfe bad $T$\nkeys\n0\n")
    with pytest.raises(ValueError, match=r"Laptops_Train\.xml\.seg:4: not UTF-8 text \(byte 0xff"):
        read_seg(seg)
    seg.write_text("\n\n")
    with pytest.raises(ValueError, match=r"Laptops_Train\.xml\.seg is empty"):
        read_seg(seg)
    xml = tmp_path / "Laptop_Train_v2.xml"
    xml.write_text("<sentences><sentence id='1'><text>No aspects.</text></sentence></sentences>")
    with pytest.raises(ValueError, match="holds no aspect terms"):
        read_xml(xml)
