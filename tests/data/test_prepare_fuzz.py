"""Property: every parser fed malformed records ends in parsed rows or an InputError naming the file (and line
where the format has lines), never another exception."""

from __future__ import annotations

import gzip
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from genrec_dist.data import amazon2014, lcrec, tabular
from genrec_dist.data.errors import InputError

FEW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
review_like = st.dictionaries(st.sampled_from(["reviewerID", "asin", "unixReviewTime", "overall", "x"]),
                              json_values, max_size=4)
# A valid-looking record, then a random cut/splice so many lines are syntactically broken.
mangled = st.tuples(review_like, st.integers(0, 80), st.text(max_size=6)).map(
    lambda t: (json.dumps(t[0])[: t[1]] + t[2]))


def check(call, path, with_line=True):
    try:
        return call()
    except InputError as err:
        assert str(err).startswith(path)
        if with_line:
            assert err.line is not None and err.line >= 1 and f"{path}:{err.line}:" in str(err)
        return None


@FEW
@given(st.lists(st.one_of(review_like.map(json.dumps), mangled), min_size=1, max_size=6))
def test_review_lines(lines):
    path = "reviews_X_5.json.gz"
    data = gzip.compress(("\n".join(lines) + "\n").encode())
    df = check(lambda: amazon2014.parse_reviews(path, data), path)
    if df is not None:
        assert df.columns == ["user", "item", "timestamp"] and df.null_count().sum_horizontal().item() == 0


meta_text = st.one_of(
    st.dictionaries(st.sampled_from(["asin", "title", "categories", "brand"]), json_values, max_size=4).map(repr),
    st.text(max_size=40),
    st.tuples(st.just("{'asin': 'B1', 'title': "), st.text(max_size=10), st.sampled_from(["}", "'}", ""])).map(
        "".join),
)


@FEW
@given(st.lists(meta_text, min_size=1, max_size=5))
def test_meta_lines(lines):
    path = "meta_X.json.gz"
    data = gzip.compress(("\n".join(lines) + "\n").encode())
    check(lambda: amazon2014.parse_meta(path, data, None), path)


@FEW
@given(st.one_of(st.dictionaries(st.text(max_size=4), json_values, max_size=4).map(json.dumps),
                 st.tuples(st.dictionaries(st.text(max_size=4), st.lists(st.integers(0, 9), max_size=4),
                                           max_size=4), st.integers(0, 60))
                 .map(lambda t: json.dumps(t[0], indent=1)[: t[1]]),
                 st.text(max_size=30)))
def test_lcrec_documents(doc):
    for parse, path in ((lcrec.parse_inter, "X.inter.json"), (lcrec.parse_items, "X.item.json")):
        check(lambda: parse(path, doc.encode()), path)


csv_cell = st.text(alphabet="ab1,\"\n 9:-T", max_size=6)


@FEW
@given(st.lists(st.tuples(csv_cell, csv_cell, csv_cell), min_size=1, max_size=5))
def test_csv_interactions(rows):
    path = "interactions.csv"
    text = "user,item,timestamp\n" + "".join(",".join(r) + "\n" for r in rows)
    df = check(lambda: tabular.parse_interactions(path, text.encode(), "user", "item", "timestamp"), path)
    if df is not None:
        assert df.null_count().sum_horizontal().item() == 0


@pytest.mark.parametrize("data", [b"", b"PAR1garbagePAR1", b"not parquet"])
def test_parquet_garbage(data):
    path = "interactions.parquet"
    with pytest.raises(InputError, match="interactions.parquet"):
        tabular.parse_interactions(path, data, "user", "item", "timestamp")


@FEW
@given(st.data())
def test_cut_or_flipped_gzip(data):
    lines = [json.dumps({"reviewerID": f"U{k % 3}", "asin": f"B{k}", "unixReviewTime": k}) for k in range(40)]
    blob = bytearray(gzip.compress(("\n".join(lines) + "\n").encode()))
    cut = data.draw(st.integers(0, len(blob)))
    blob = blob[:cut]
    if blob and data.draw(st.booleans()):
        at = data.draw(st.integers(0, len(blob) - 1))
        blob[at] ^= data.draw(st.integers(1, 255))
    path = "reviews_X_5.json.gz"
    df = check(lambda: amazon2014.parse_reviews(path, bytes(blob)), path)
    if df is not None:
        assert df.height <= 40
