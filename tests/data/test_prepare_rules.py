"""The cleaning rules of prepare on hand-made cases: de-duplication, k-core, tie-breaking, ids, text, split."""

from __future__ import annotations

import polars as pl
import pytest

from genrec_dist.data import clean, text
from genrec_dist.data.dataset import Dataset, split_user
from genrec_dist.data.prepare import run_prepare

from _raw_inputs import make_cfg


def frame(rows):
    return clean.with_order(pl.DataFrame(rows, schema={"user": pl.Utf8, "item": pl.Utf8, "timestamp": pl.Int64},
                                         orient="row"))


def test_k_core_is_iterative_on_a_hand_case():
    # k=3. Round 1: u3 (2 events) and d (2) go; then c has 2 (u0, u2) -> round 2: c goes; then u2 has 2
    # (a, b) -> round 3: u2 goes. Left: u0 and u1 with a and b, each with exactly 3 events.
    rows = [("u0", "a", 1), ("u0", "b", 2), ("u0", "c", 3), ("u0", "a", 4),
            ("u1", "a", 1), ("u1", "b", 2), ("u1", "b", 3), ("u1", "d", 4),
            ("u2", "a", 1), ("u2", "b", 2), ("u2", "c", 3),
            ("u3", "c", 1), ("u3", "d", 2)]
    out, rounds = clean.k_core(frame(rows), 3)
    assert sorted(set(out["user"])) == ["u0", "u1"]
    assert sorted(set(out["item"])) == ["a", "b"]
    # every survivor meets k, and the loop needed more than one pass
    assert out.group_by("user").len()["len"].min() >= 3
    assert out.group_by("item").len()["len"].min() >= 3
    assert rounds >= 3


def test_k_core_of_one_keeps_users_with_three_events():
    out, _ = clean.k_core(frame([("u", "a", 1), ("u", "b", 2), ("v", "a", 1), ("v", "b", 2), ("v", "c", 3)]), 1)
    assert set(out["user"]) == {"v"}  # leave-one-out needs 3 events


def test_dedup_keeps_first_of_exact_repeats_only():
    df = frame([("u", "a", 5), ("u", "a", 5), ("u", "a", 6), ("u", "b", None), ("u", "b", None)])
    out, dropped = clean.deduplicate(df)
    assert dropped == 1
    assert out["_order"].to_list() == [0, 2, 3, 4]  # no-timestamp repeats are separate events


def test_order_is_by_time_then_source_order():
    df = frame([("u", "late", 30), ("u", "tie2", 20), ("u", "tie1", 20), ("u", "early", 10)])
    users, items = clean.id_map(df["user"], "user"), clean.id_map(df["item"], "item")
    seq = clean.sequences(df, users, items, has_time=True)
    names = dict(zip(items["item_id"], items["item"]))
    assert [names[i] for i in seq["items"][0]] == ["early", "tie2", "tie1", "late"]
    assert seq["timestamps"][0].to_list() == [10, 20, 20, 30]


def test_sources_without_time_keep_positions():
    df = frame([("u", "c", None), ("u", "a", None), ("u", "c", None)])
    users, items = clean.id_map(df["user"], "user"), clean.id_map(df["item"], "item")
    seq = clean.sequences(df, users, items, has_time=False)
    names = dict(zip(items["item_id"], items["item"]))
    assert [names[i] for i in seq["items"][0]] == ["c", "a", "c"]
    assert seq["timestamps"][0] is None


def test_ids_follow_numeric_keys_when_all_are_integers():
    assert clean.key_order(pl.Series(["10", "9", "100", "0"])).to_list() == ["0", "9", "10", "100"]
    assert clean.key_order(pl.Series(["b10", "b9", "a"])).to_list() == ["a", "b10", "b9"]
    ids = clean.id_map(pl.Series(["7", "3", "3"]), "item")
    assert ids.to_dicts() == [{"item": "3", "item_id": 1}, {"item": "7", "item_id": 2}]


@pytest.mark.parametrize("row, expected", [
    ({"title": "Cream", "brand": "Acme", "categories": "Beauty, Face", "description": "Soft."},
     "Cream. Brand: Acme. Categories: Beauty, Face. Soft."),
    ({"title": "Cream", "brand": None, "categories": "Beauty", "description": None}, "Cream. Categories: Beauty"),
    ({"title": "  Cream\n  Deluxe. ", "brand": "", "categories": None, "description": "x  y"}, "Cream Deluxe. x y"),
    ({"title": None, "brand": "Acme", "categories": None, "description": None}, "item k1. Brand: Acme"),
])
def test_template_renders_and_tidies(row, expected):
    items = pl.DataFrame([{"item": "k1", **row}], schema={"item": pl.Utf8, "title": pl.Utf8, "brand": pl.Utf8,
                                                          "categories": pl.Utf8, "description": pl.Utf8})
    out, missing = text.build_text(items, "{title}. Brand: {brand}. Categories: {categories}. {description}", 2000)
    assert out["text"][0] == expected
    assert missing == (0 if row["title"] and row["title"].strip() else 1)


def test_template_missing_field_and_cut():
    items = pl.DataFrame({"item": ["k"], "title": ["abcdef"]})
    assert text.render(items, "{title} [{color}]", 2000)[0] == "abcdef"
    assert text.render(items, "{title} {title}", 8)[0] == "abcdef a"
    with pytest.raises(ValueError, match="text_template"):
        text.template_fields("{title!r}")


def test_split_rule_on_a_prepared_dataset(tiny_dataset):
    ds = Dataset.open(tiny_dataset)
    assert ds.manifest["split"]["rule"] == "leave-one-out" and ds.max_history == 50  # SASRec §IV-B: n=50
    seqs = ds.sequences()
    assert seqs["user_id"].to_list() == list(range(1, ds.num_users + 1))
    long = seqs.filter(pl.col("items").list.len() > 25)["items"][0].to_list()
    sp = split_user(long, 20)  # the SID models' history (TIGER §4.1)
    assert sp["test"] == (long[:-1][-20:], long[-1]) and sp["valid"] == (long[:-2][-20:], long[-2])
    assert len(sp["test"][0]) == 20 and sp["train"] == long[:-2]
    # every id is contiguous and padding-free
    items = ds.items()
    assert items["item_id"].to_list() == list(range(1, ds.num_items + 1))
    flat = seqs["items"].explode()
    assert flat.min() >= 1 and flat.max() == ds.num_items and flat.n_unique() == ds.num_items


def test_synthetic_is_deterministic_and_seeded(tmp_path):
    sizes = ["prepare.synthetic.num_items=80", "prepare.synthetic.num_users=150", "prepare.num_shards=2"]
    a = run_prepare(make_cfg(tmp_path / "a", *sizes))
    b = run_prepare(make_cfg(tmp_path / "b", *sizes))
    c = run_prepare(make_cfg(tmp_path / "c", *sizes, "seed=7"))
    da, db, dc = (Dataset.open(s["dataset"]) for s in (a, b, c))
    assert da.sequences().equals(db.sequences()) and da.items().equals(db.items())
    assert not da.sequences().equals(dc.sequences())
    assert a["users"] == 150 and a["items_without_title"] == 0


def test_synthetic_structure_beats_popularity(tiny_dataset):
    """The sequences are learnable: a first-order transition count beats most-popular on the test targets."""
    from collections import Counter, defaultdict

    seqs = Dataset.open(tiny_dataset).sequences()["items"].to_list()
    pop, nxt = Counter(), defaultdict(Counter)
    for s in seqs:
        train = s[:-2]
        pop.update(train)
        for a, b in zip(train, train[1:]):
            nxt[a][b] += 1
    top = [i for i, _ in pop.most_common(10)]
    hit_pop = hit_seq = 0
    for s in seqs:
        hist, target = split_user(s, 20)["test"]
        cands = [i for i, _ in nxt[hist[-1]].most_common(10)]
        cands += [i for i in top if i not in cands][: 10 - len(cands)]
        hit_pop += target in top
        hit_seq += target in cands
    assert hit_seq > 1.3 * hit_pop
