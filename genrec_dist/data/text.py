"""Item text from a template over the item's fields (``prepare.text_template``), vectorised in Polars.

The template is a Python format string (``"{title}. Brand: {brand}. Categories: {categories}. {description}"``):
a field the item lacks renders as empty and is dropped together with its label (:func:`segments`), whitespace is
collapsed, and the result is cut to ``max_text_chars``.

An item without a title (no record in the item file, or an empty title) gets the fallback title
``"item <source key>"`` so it still has a distinct, non-empty text; :func:`build_text` counts those items.
"""

from __future__ import annotations

import string

import polars as pl

from genrec_dist.errors import ConfigError

FALLBACK_TITLE = "item {item}"


def template_fields(template: str) -> list[str]:
    """The field names a template uses, in order; a bad template is a ``ValueError`` naming it."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(f"prepare.text_template {template!r}: {exc}") from None
    fields = []
    for _, name, spec, conv in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conv:
            raise ConfigError(f"prepare.text_template {template!r}: use plain fields like {{title}}, got {{{name}}}")
        fields.append(name)
    return fields


def render(items: pl.DataFrame, template: str, max_chars: int) -> pl.Series:
    """The template rendered for every row of ``items``, tidied (see :func:`segments` for the rule)."""
    pieces: list[pl.Expr] = []
    last_field: pl.Expr | None = None
    for literal, name in segments(template):
        if name is None:  # text after the last field: kept only when that field rendered
            pieces.append(pl.lit(literal) if last_field is None
                          else pl.when(last_field != "").then(pl.lit(literal)).otherwise(pl.lit("")))
            continue
        value = (pl.col(name).cast(pl.Utf8).fill_null("") if name in items.columns else pl.lit(""))
        value = value.str.replace_all(r"\s+", " ").str.strip_chars()
        pieces.append(pl.when(value != "").then(pl.concat_str([pl.lit(literal), value])).otherwise(pl.lit("")))
        last_field = value
    if not pieces:
        return pl.Series("text", [""] * items.height, dtype=pl.Utf8)
    expr = (
        pl.concat_str(pieces)
        .str.replace_all(r"([^.])\.\.(\s|$)", "${1}.${2}")  # "Torque." + ". Brand" -> "Torque. Brand"
        .str.replace_all(r"\s+", " ")
        .str.strip_chars_start(" .;,:")
        .str.strip_chars_end()
    )
    if max_chars > 0:
        expr = expr.str.slice(0, max_chars).str.strip_chars_end()
    return items.select(expr.alias("text")).to_series()


def segments(template: str) -> list[tuple[str, str | None]]:
    """``(literal before the field, field)`` pairs, then ``(trailing literal, None)``.

    A field that renders empty is dropped *with the literal before it* (its label: ``". Brand: "``), and the
    trailing literal is kept only when the last field is non-empty, so ``"{title}. Brand: {brand}. {description}"``
    renders ``"T. D"`` for an item without a brand and ``"T"`` for one with neither.
    """
    out: list[tuple[str, str | None]] = []
    pending = ""
    for literal, name, _, _ in string.Formatter().parse(template):
        pending += literal
        if name is not None:
            out.append((pending, name))
            pending = ""
    out.append((pending, None))
    return out


def build_text(items: pl.DataFrame, template: str, max_chars: int) -> tuple[pl.DataFrame, int]:
    """Add ``title`` (with the fallback) and ``text`` columns; returns the frame and the count of items that
    had no title."""
    template_fields(template)
    if "title" not in items.columns:
        items = items.with_columns(pl.lit(None, dtype=pl.Utf8).alias("title"))
    title = pl.col("title").fill_null("").str.replace_all(r"\s+", " ").str.strip_chars()
    items = items.with_columns(title.alias("title"))
    missing = items.select((pl.col("title") == "").sum()).item()
    items = items.with_columns(
        pl.when(pl.col("title") == "")
        .then(pl.format(FALLBACK_TITLE.replace("{item}", "{}"), pl.col("item")))
        .otherwise(pl.col("title"))
        .alias("title")
    )
    return items.with_columns(render(items, template, max_chars)), int(missing)
