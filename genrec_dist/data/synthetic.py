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

Scale: users are generated in chunks of ``users_per_chunk`` (interactions of one chunk at a time, handed to prepare
as batches), so 100x Beauty (2.2M users) takes bounded memory. A catalog of at most one chunk of users is drawn
exactly as a single block from the seed's generator; larger ones draw each chunk from its own generator
(``SeedSequence(seed).spawn``), still a pure function of the seed and the sizes.

Why it is learnable: the category of the last items, the ring drift and the product-line successor predict the
next item far better than global popularity does, so a sequential model clearly beats most-popular, and models
that see item text (semantic IDs) can exploit that items of one category share words.
"""

from __future__ import annotations

from typing import Any, Callable

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
    if cfg.users_per_chunk < 1:
        raise ConfigError(f"prepare.synthetic.users_per_chunk must be >= 1, got {cfg.users_per_chunk}")
    rng = np.random.default_rng(seed)
    n = cfg.num_items
    c_count = min(cfg.num_categories, n)

    # Items: category c holds slots offsets[c] .. offsets[c] + sizes[c] - 1, slot = offset + popularity rank.
    sizes = np.full(c_count, n // c_count, dtype=np.int64)
    sizes[: n % c_count] += 1
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    key_of_slot = rng.permutation(n)  # slot -> item key number
    items = _items(rng, sizes, key_of_slot)
    world = _World(cfg, sizes, offsets, key_of_slot)
    n_best = min(n, max(3, n // 100))
    if cfg.num_users <= cfg.users_per_chunk:  # one block, drawn exactly as the generator always has
        lengths, cat = world.draw_users(rng, cfg.num_users)
        world.set_bestsellers(rng, n_best)
        batches = iter([world.interactions(rng, 0, lengths, cat)])
    else:
        world.set_bestsellers(rng, n_best)
        batches = _chunks(world, cfg, seed)
    info = {"generator": "genrec_dist.data.synthetic", "seed": seed, "categories": c_count,
            "bestsellers": n_best}
    return RawData(batches=batches, items=None, load_items=items, info=info)


def _chunks(world: "_World", cfg: SyntheticConfig, seed: int):
    starts = range(0, cfg.num_users, cfg.users_per_chunk)
    for start, seq in zip(starts, np.random.SeedSequence(seed).spawn(len(starts))):
        rng = np.random.default_rng(seq)
        lengths, cat = world.draw_users(rng, min(cfg.users_per_chunk, cfg.num_users - start))
        yield world.interactions(rng, start, lengths, cat)


class _World:
    """The catalog's fixed structure; draws users' sequences one chunk at a time."""

    def __init__(self, cfg: SyntheticConfig, sizes: np.ndarray, offsets: np.ndarray, key_of_slot: np.ndarray):
        self.cfg, self.sizes, self.offsets, self.key_of_slot = cfg, sizes, offsets, key_of_slot
        self.c_count, self.n = len(sizes), int(sizes.sum())

    def draw_users(self, rng: np.random.Generator, u: int) -> tuple[np.ndarray, np.ndarray]:
        cfg = self.cfg
        lengths = cfg.min_length + np.floor(rng.exponential((cfg.max_length - cfg.min_length) / 6 + 1e-9, u))
        lengths = np.clip(lengths, cfg.min_length, cfg.max_length).astype(np.int64)
        cat_w = 1.0 / np.sqrt(np.arange(1, self.c_count + 1))
        return lengths, rng.choice(self.c_count, size=u, p=cat_w / cat_w.sum())

    def set_bestsellers(self, rng: np.random.Generator, n_best: int) -> None:
        self.n_best = n_best
        self.best_slots = rng.choice(self.n, size=n_best, replace=False)
        best_w = 1.0 / np.arange(1, n_best + 1)
        self.best_w = best_w / best_w.sum()

    def interactions(self, rng: np.random.Generator, first_user: int, lengths: np.ndarray, cat: np.ndarray
                     ) -> pl.DataFrame:
        """Users ``first_user ..`` with these lengths and home categories (vectorised over users, step by step)."""
        cfg, sizes, offsets, c_count = self.cfg, self.sizes, self.offsets, self.c_count
        u, steps = len(lengths), int(lengths.max())

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
            slots[:, t] = np.where(popular, self.best_slots[rng.choice(self.n_best, size=u, p=self.best_w)],
                                   offsets[cat] + rank)

        mask = np.arange(steps)[None, :] < lengths[:, None]  # (U, T)
        gaps = 600 + np.floor(rng.exponential(7 * 86_400, (u, steps))).astype(np.int64)
        start = START_2010 + rng.integers(0, 2 * 365 * 86_400, u)
        times = start[:, None] + np.cumsum(gaps, axis=1)  # (U, T)
        return pl.DataFrame({
            "user": np.repeat(np.arange(first_user, first_user + u), lengths),
            "item": self.key_of_slot[slots[mask]],
            "timestamp": times[mask],
        }).with_columns(pl.col("user").cast(pl.Utf8), pl.col("item").cast(pl.Utf8),
                        pl.col("timestamp").cast(pl.Int64))


def _items(rng: np.random.Generator, sizes: np.ndarray, key_of_slot: np.ndarray) -> Callable[[Any], pl.DataFrame]:
    """Draw every item's parts now (the generator's order); the strings are built when prepare asks for them,
    after the interactions are cleaned."""
    cats = category_names(len(sizes))
    brands = [[_brand(rng) for _ in range(BRANDS_PER_CATEGORY)] for _ in cats]
    n = int(sizes.sum())
    cat_of_slot = np.repeat(np.arange(len(sizes)), sizes)
    noun_ix = rng.integers(0, 4, n)
    brand_ix = rng.integers(0, BRANDS_PER_CATEGORY, n)
    adj_ix = rng.integers(0, len(ADJECTIVES), n)
    var_ix = rng.integers(0, len(VARIANTS), n)
    return lambda wanted: _item_frame(cats, brands, cat_of_slot, noun_ix, brand_ix, adj_ix, var_ix, key_of_slot)


def _item_frame(cats, brands, cat_of_slot, noun_ix, brand_ix, adj_ix, var_ix, key_of_slot) -> pl.DataFrame:
    # The same strings a per-item loop would format, built column-wise (1M+ items without 4M Python strings).
    names = np.array([name for name, _ in cats], dtype=object)
    noun = pl.Series(np.array([nouns[k] for _, nouns in cats for k in range(4)], dtype=object)[cat_of_slot * 4 + noun_ix],
                     dtype=pl.Utf8)
    b = pl.Series(np.array([x for row in brands for x in row], dtype=object)[cat_of_slot * BRANDS_PER_CATEGORY + brand_ix],
                  dtype=pl.Utf8)
    adj = pl.Series(np.array(ADJECTIVES, dtype=object)[adj_ix], dtype=pl.Utf8)
    var = pl.Series(np.array(VARIANTS, dtype=object)[var_ix], dtype=pl.Utf8)
    cat = pl.Series(names[cat_of_slot], dtype=pl.Utf8)
    frame = pl.DataFrame({"noun": noun, "b": b, "adj": adj, "var": var, "cat": cat})
    return frame.select(
        pl.Series("item", key_of_slot).cast(pl.Utf8),
        pl.format("{} {} {}, {}", "b", "adj", "noun", "var").alias("title"),
        pl.col("b").alias("brand"),
        pl.format("Catalog, {}", "cat").alias("categories"),
        pl.format("{} {} by {} for everyday {}. Variant: {}.", "adj", pl.col("noun").str.to_lowercase(), "b",
                  pl.col("cat").str.to_lowercase(), "var").alias("description"),
        pl.col("cat").alias("category"),
    )
