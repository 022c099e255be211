"""A deterministic synthetic catalog: the embedded default for the demo and the tests.

Structure (everything drawn from one ``numpy`` generator seeded by ``Config.seed``, so a seed gives the same
bytes on every machine):

Items
    ``num_items`` items split evenly over ``num_categories`` latent categories (Skin Care, Hair Care, ...). Within a
    category items have a popularity rank ``r`` (0 = most popular) and form a *product line* in rank order. Each item
    gets a category-specific noun, a brand from its category's four brands, a shared adjective and a variant, so
    its generated text reflects its category::

        title       "Lumora Hydrating Serum, Lavender"
        brand       "Lumora"
        categories  "Catalog, Skin Care"
        description "Hydrating serum by Lumora for everyday skin care. Variant: Lavender."

    Item keys are ``"0" .. "N-1"`` in a random permutation, so a key says nothing about the category.

Users
    Each user has a sequence length ``min_length + Exponential((max_length - min_length) / 6)`` (clipped), a
    home category drawn with weights ``1/sqrt(c+1)`` and, at every step after the first:

    * with ``stay_prob`` the user stays in the current category, otherwise drifts: to the *next* category on a
      ring ``(c + 1) % C`` with ``next_category_prob``, else to a uniformly random one;
    * inside the category, with ``successor_prob`` (only when not drifting) the next item of the product line
      (rank ``r + 1``), otherwise a rank drawn as ``floor(size * U**2)`` (``U`` uniform: a power-law popularity);
    * with ``popular_prob`` the step is instead one of ``max(3, N // 100)`` global bestsellers (weights
      ``1/(j+1)``); it leaves the user's category state unchanged.

    Timestamps start uniformly in 2010-2012 and advance by 10 minutes plus an exponential gap of mean 7 days.

Why it is learnable: the category of the last items, the ring drift and the product-line successor predict the
next item far better than global popularity does, so a sequential model clearly beats most-popular, and models
that see item text (semantic IDs) can exploit that items of one category share words.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from genrec_dist.data.config import SyntheticConfig
from genrec_dist.data.raw import RawData
from genrec_dist.errors import ConfigError

CATEGORIES = [
    ("Skin Care", ["Serum", "Moisturizer", "Cleanser", "Toner"]),
    ("Hair Care", ["Shampoo", "Conditioner", "Hair Mask", "Hair Oil"]),
    ("Makeup", ["Foundation", "Concealer", "Mascara", "Eyeliner"]),
    ("Fragrance", ["Eau de Parfum", "Body Mist", "Cologne", "Perfume Oil"]),
    ("Nail Care", ["Nail Polish", "Top Coat", "Cuticle Oil", "Nail File"]),
    ("Bath & Body", ["Body Wash", "Bath Salts", "Body Lotion", "Body Scrub"]),
    ("Men's Grooming", ["Beard Oil", "Shaving Cream", "Aftershave", "Trimmer"]),
    ("Oral Care", ["Toothpaste", "Mouthwash", "Whitening Strips", "Dental Floss"]),
    ("Sun Care", ["Sunscreen", "After-Sun Gel", "Tanning Lotion", "SPF Stick"]),
    ("Tools & Brushes", ["Brush Set", "Makeup Sponge", "Eyelash Curler", "Vanity Mirror"]),
    ("Lip Care", ["Lip Balm", "Lipstick", "Lip Gloss", "Lip Scrub"]),
    ("Eye Care", ["Eye Cream", "Eye Patches", "Brow Gel", "Lash Serum"]),
    ("Kitchen", ["Skillet", "Knife Set", "Blender", "Cutting Board"]),
    ("Camping", ["Tent", "Sleeping Bag", "Lantern", "Hiking Backpack"]),
    ("Office", ["Stapler", "Notebook", "Desk Lamp", "Pen Set"]),
    ("Garden", ["Trowel", "Garden Hose", "Planter", "Seed Kit"]),
    ("Pet Supplies", ["Dog Leash", "Cat Toy", "Pet Bed", "Food Bowl"]),
    ("Toys", ["Jigsaw Puzzle", "Building Blocks", "Plush Bear", "Board Game"]),
    ("Fitness", ["Yoga Mat", "Dumbbell", "Resistance Band", "Jump Rope"]),
    ("Electronics", ["Headphones", "Wall Charger", "Bluetooth Speaker", "USB Cable"]),
    ("Baby", ["Diaper Cream", "Baby Wipes", "Pacifier", "Feeding Bottle"]),
    ("Automotive", ["Car Wax", "Wiper Blades", "Floor Mats", "Air Freshener"]),
    ("Lab Supplies", ["Pipette", "Beaker", "Test Tubes", "Nitrile Gloves"]),
    ("Music", ["Guitar Strings", "Drumsticks", "Capo", "Clip Tuner"]),
]
ADJECTIVES = ["Hydrating", "Gentle", "Classic", "Ultra", "Natural", "Premium", "Compact", "Deluxe", "Organic",
              "Professional", "Lightweight", "Daily", "Advanced", "Essential", "Travel", "Fresh"]
VARIANTS = ["Lavender", "Unscented", "Citrus", "Black", "Rose", "Mint", "Original", "Large", "Mini", "Value Pack",
            "Coconut", "Blue"]
SYLLABLES = ["lu", "mo", "ra", "vi", "ka", "ne", "so", "ta", "ri", "el", "an", "do", "fi", "za", "ko", "be"]
BRANDS_PER_CATEGORY = 4
START_2010 = 1_262_304_000  # 2010-01-01 UTC


def category_names(num_categories: int) -> list[tuple[str, list[str]]]:
    """Names and nouns of ``num_categories`` categories (a numbered suffix once the 24 bases are used)."""
    out = []
    for c in range(num_categories):
        name, nouns = CATEGORIES[c % len(CATEGORIES)]
        if c >= len(CATEGORIES):
            name = f"{name} {c // len(CATEGORIES) + 1}"
        out.append((name, nouns))
    return out


def _brand(rng: np.random.Generator) -> str:
    parts = rng.choice(len(SYLLABLES), size=3)
    return "".join(SYLLABLES[p] for p in parts).capitalize()


def generate(cfg: SyntheticConfig, seed: int) -> RawData:
    """The synthetic catalog and interaction log (see the module docstring for the structure)."""
    if cfg.num_items < 1 or cfg.num_users < 1 or cfg.num_categories < 1:
        raise ConfigError("prepare.synthetic: num_items, num_users and num_categories must be >= 1")
    if not 1 <= cfg.min_length <= cfg.max_length:
        raise ConfigError(f"prepare.synthetic: need 1 <= min_length <= max_length, got "
                         f"{cfg.min_length}, {cfg.max_length}")
    rng = np.random.default_rng(seed)
    n, u = cfg.num_items, cfg.num_users
    c_count = min(cfg.num_categories, n)

    # Items: category c holds slots offsets[c] .. offsets[c] + sizes[c] - 1, slot = offset + popularity rank.
    sizes = np.full(c_count, n // c_count, dtype=np.int64)
    sizes[: n % c_count] += 1
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    key_of_slot = rng.permutation(n)  # slot -> item key number
    items = _items(rng, sizes, key_of_slot)

    # Users (vectorised over users, one step at a time).
    lengths = cfg.min_length + np.floor(rng.exponential((cfg.max_length - cfg.min_length) / 6 + 1e-9, u))
    lengths = np.clip(lengths, cfg.min_length, cfg.max_length).astype(np.int64)
    steps = int(lengths.max())
    cat_w = 1.0 / np.sqrt(np.arange(1, c_count + 1))
    cat = rng.choice(c_count, size=u, p=cat_w / cat_w.sum())
    n_best = min(n, max(3, n // 100))
    best_slots = rng.choice(n, size=n_best, replace=False)
    best_w = 1.0 / np.arange(1, n_best + 1)
    best_w /= best_w.sum()

    def draw_rank(c: np.ndarray) -> np.ndarray:
        return np.minimum(np.floor(sizes[c] * rng.random(c.shape[0]) ** 2).astype(np.int64), sizes[c] - 1)

    slots = np.empty((u, steps), dtype=np.int64)
    rank = draw_rank(cat)
    slots[:, 0] = offsets[cat] + rank
    for t in range(1, steps):
        r = rng.random((u, 4))
        drift = r[:, 0] >= cfg.stay_prob
        ring = r[:, 1] < cfg.next_category_prob
        cat = np.where(drift, np.where(ring, (cat + 1) % c_count, rng.integers(0, c_count, u)), cat)
        successor = ~drift & (r[:, 2] < cfg.successor_prob)
        rank = np.where(successor, (rank + 1) % sizes[cat], draw_rank(cat))
        popular = r[:, 3] < cfg.popular_prob
        slots[:, t] = np.where(popular, best_slots[rng.choice(n_best, size=u, p=best_w)], offsets[cat] + rank)

    mask = np.arange(steps)[None, :] < lengths[:, None]  # (U, T)
    gaps = 600 + np.floor(rng.exponential(7 * 86_400, (u, steps))).astype(np.int64)
    start = START_2010 + rng.integers(0, 2 * 365 * 86_400, u)
    times = start[:, None] + np.cumsum(gaps, axis=1)  # (U, T)
    interactions = pl.DataFrame({
        "user": np.repeat(np.arange(u), lengths),
        "item": key_of_slot[slots[mask]],
        "timestamp": times[mask],
    }).with_columns(pl.col("user").cast(pl.Utf8), pl.col("item").cast(pl.Utf8), pl.col("timestamp").cast(pl.Int64))
    info = {"generator": "genrec_dist.data.synthetic", "seed": seed, "categories": c_count,
            "bestsellers": n_best}
    return RawData(interactions=interactions, items=items, info=info)


def _items(rng: np.random.Generator, sizes: np.ndarray, key_of_slot: np.ndarray) -> pl.DataFrame:
    cats = category_names(len(sizes))
    brands = [[_brand(rng) for _ in range(BRANDS_PER_CATEGORY)] for _ in cats]
    n = int(sizes.sum())
    cat_of_slot = np.repeat(np.arange(len(sizes)), sizes)
    noun_ix = rng.integers(0, 4, n)
    brand_ix = rng.integers(0, BRANDS_PER_CATEGORY, n)
    adj_ix = rng.integers(0, len(ADJECTIVES), n)
    var_ix = rng.integers(0, len(VARIANTS), n)
    title, brand, categories, description = [], [], [], []
    for s in range(n):
        c = cat_of_slot[s]
        name, nouns = cats[c]
        noun, b, adj, var = nouns[noun_ix[s]], brands[c][brand_ix[s]], ADJECTIVES[adj_ix[s]], VARIANTS[var_ix[s]]
        title.append(f"{b} {adj} {noun}, {var}")
        brand.append(b)
        categories.append(f"Catalog, {name}")
        description.append(f"{adj} {noun.lower()} by {b} for everyday {name.lower()}. Variant: {var}.")
    return pl.DataFrame({
        "item": [str(k) for k in key_of_slot],
        "title": title, "brand": brand, "categories": categories, "description": description,
        "category": [cats[c][0] for c in cat_of_slot],
    })
