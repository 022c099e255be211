"""Raw-format input files the data tests write themselves (Amazon 2014 reviews and meta), and small helpers."""

from __future__ import annotations

import gzip
import json
import os

from genrec_dist.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
USERS = [f"A{u:02d}" for u in range(7)]
ITEMS = [f"B00{i}" for i in range(6)]


def write_gz(path, text: str) -> str:
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write(text)
    return str(path)


def amazon_reviews() -> list[dict]:
    """7 users x 6 items (every user reviews every item once: a 6-core), in a rotated order per user, plus noise
    the prepare must remove: a user with 2 reviews, an item with 2 reviews, one exact duplicate line."""
    rows = []
    for u, user in enumerate(USERS):
        for j in range(6):
            item = ITEMS[(u + j) % 6]
            rows.append({"reviewerID": user, "asin": item, "reviewerName": "x", "helpful": [0, 0],
                         "reviewText": "fine", "overall": 5.0, "summary": "ok",
                         "unixReviewTime": 1_300_000_000 + 1000 * u + 10 * j, "reviewTime": "03 13, 2011"})
    # A0's last two reviews share a timestamp: source order decides (B005 before B000 in the file).
    rows[5]["unixReviewTime"] = rows[4]["unixReviewTime"]
    rows.append(dict(rows[3]))  # exact duplicate of A00's 4th review
    rows += [{"reviewerID": "Zshort", "asin": ITEMS[0], "unixReviewTime": 1_400_000_000},
             {"reviewerID": "Zshort", "asin": ITEMS[1], "unixReviewTime": 1_400_000_001},
             {"reviewerID": USERS[1], "asin": "Brare", "unixReviewTime": 1_400_000_002},
             {"reviewerID": USERS[2], "asin": "Brare", "unixReviewTime": 1_400_000_003}]
    return rows


def amazon_meta() -> list[dict]:
    meta = []
    for i, item in enumerate(ITEMS):
        rec = {"asin": item, "title": f"Product {i} Cream", "price": 9.5 + i, "imUrl": "http://x/y.jpg",
               "related": {"also_bought": ["B001"]}, "salesRank": {"Beauty": 100 + i},
               "brand": f"Brand{i}", "categories": [["Beauty", "Skin Care", "Face"], ["Beauty", "Gifts"]],
               "description": f"A cream, number {i}."}
        if i == 4:
            continue  # B004 has no meta line at all
        if i == 5:
            del rec["title"], rec["brand"]  # B005 has no title
        meta.append(rec)
    meta.append({"asin": "Brare", "title": "Rare"})
    return meta


def write_amazon(folder, category: str = "Beauty", reviews=None, meta=None, five_core: bool = True) -> str:
    os.makedirs(folder, exist_ok=True)
    reviews = amazon_reviews() if reviews is None else reviews
    meta = amazon_meta() if meta is None else meta
    name = f"reviews_{category}_5.json.gz" if five_core else f"reviews_{category}.json.gz"
    write_gz(os.path.join(folder, name), "".join(json.dumps(r) + "\n" for r in reviews))
    # The published meta files hold Python dict literals (repr: single quotes), not JSON.
    write_gz(os.path.join(folder, f"meta_{category}.json.gz"), "".join(repr(m) + "\n" for m in meta))
    return str(folder)


def make_cfg(tmp_path, *overrides: str, config: str = "synthetic.yaml"):
    return load_config(os.path.join(REPO, "configs", config), [f"workdir={tmp_path}", *overrides])


def snapshot(path) -> dict[str, bytes]:
    """Every file under ``path`` (relative name -> bytes); {} when absent."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            full = os.path.join(root, f)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, path)] = fh.read()
    return out
