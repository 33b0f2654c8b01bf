"""Document filters: NFC, control characters, PII, the Codex rules, exact and near duplicates."""

from __future__ import annotations

import unicodedata

from chatforge.data.clean import (
    NearDuplicateIndex,
    codex_filter_reason,
    dedup_key,
    normalize_unicode,
    scrub_pii,
    strip_control_chars,
)


def test_nfc_and_control_characters():
    decomposed = unicodedata.normalize("NFD", "café")
    assert normalize_unicode(decomposed) == "café" and len(normalize_unicode(decomposed)) == 4
    text, removed = strip_control_chars("a\x00b\x07c\td\ne\ufeff")
    assert text == "abc\td\ne" and removed == 3


def test_pii_is_replaced_and_counted_by_kind():
    text = ("Mail jane.doe@example.com or call +1 (415) 555-0134; server 93.184.216.34 (docs range 203.0.113.9 stays) "
            "key sk-abcdefghijklmnopqrstuvwxyz0123456789ABCD and version 3.11.2 stays")
    scrubbed, counts = scrub_pii(text)
    assert (
        "jane.doe" not in scrubbed
        and "555-0134" not in scrubbed
        and "93.184.216.34" not in scrubbed
        and "203.0.113.9" in scrubbed
    )
    assert "sk-abcdef" not in scrubbed and "3.11.2" in scrubbed
    assert counts["EMAIL"] == 1 and counts["PHONE"] == 1 and counts["IP"] == 1 and counts["KEY"] == 1


def test_codex_filters_name_the_rule():
    good = "def add(a, b):\n    return a + b\n"
    assert codex_filter_reason(good) is None
    assert codex_filter_reason("# This file is auto-generated. Do not edit.\nx = 1\n") == "auto_generated"
    assert codex_filter_reason("x = '" + "a" * 1200 + "'\n") == "max_line_length"
    assert codex_filter_reason(("y = '" + "b" * 150 + "'\n") * 5) == "mean_line_length"
    assert codex_filter_reason("#### ---- ==== ;;;; ////\n" * 10) == "low_alphanumeric"
    assert codex_filter_reason("x = 1\n" * 200_000) == "too_large"


def test_exact_and_near_duplicates():
    assert dedup_key("Hello   World") == dedup_key("hello world")
    base = " ".join(f"word{i}" for i in range(300))
    index = NearDuplicateIndex(threshold=0.8)
    assert index.add("a", base) is None
    assert index.add("b", base.replace("word150", "changed")) == "a"  # one word of 300 differs
    assert index.add("c", " ".join(f"other{i}" for i in range(300))) is None
