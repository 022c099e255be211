import itertools

import numpy as np
import pytest
import torch

from genrec_dist.models.beam_search import CodeTrie, beam_search

from toys import make_sids

SIZES = [3, 4, 2]


def random_codes(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(0, k, n) for k in SIZES], axis=1)


def test_trie_contains_exactly_the_existing_codes():
    codes = random_codes(10, 0)
    trie = CodeTrie(make_sids(codes, SIZES).codes, SIZES)
    every = torch.tensor(list(itertools.product(*(range(k) for k in SIZES))))  # all 24 codes
    existing = {tuple(c) for c in codes.tolist()}
    assert 0 < len(existing) < len(every)
    assert trie.contains(every).tolist() == [tuple(c) in existing for c in every.tolist()]


def test_trie_children_match_the_prefix_set():
    codes = random_codes(12, 1)
    trie = CodeTrie(make_sids(codes, SIZES).codes, SIZES)
    # Walk every existing prefix, all nodes of one depth in one call (as the beam search does): allowed children ==
    # the codes that follow the prefix in the table, and only those have a child.
    frontier = [()]
    nodes = torch.zeros(1, dtype=torch.long)
    for level, k in enumerate(SIZES):
        allowed = trie.allowed(level, nodes)  # (prefixes, K)
        nxt, nxt_nodes = [], []
        for row, prefix in enumerate(frontier):
            expected = {c[level] for c in codes.tolist() if tuple(c[:level]) == prefix}
            assert set(torch.nonzero(allowed[row]).view(-1).tolist()) == expected
            exists, child = trie.child(level, nodes[row].repeat(k), torch.arange(k))
            assert set(torch.nonzero(exists).view(-1).tolist()) == expected
            nxt += [prefix + (c,) for c in sorted(expected)]
            nxt_nodes += [child[c] for c in sorted(expected)]
        frontier, nodes = nxt, torch.stack(nxt_nodes)
    assert sorted(frontier) == sorted({tuple(c) for c in codes.tolist()})
    assert sorted(nodes.tolist()) == list(range(len(frontier)))  # leaf ids are compact


def test_collisions_expand_to_distinct_items():
    codes = np.array([[0, 1, 1], [2, 0, 0], [0, 1, 1], [1, 3, 0], [0, 1, 1]])  # items 1, 3, 5 share a code
    trie = CodeTrie(make_sids(codes, SIZES).codes, SIZES)
    shared = trie.contains(torch.tensor([[0, 1, 1]]))
    assert shared.all()
    # Leaves of (0,1,1), (1,3,0), (2,0,0) ranked in that order; a last invalid beam adds nothing.
    node = torch.zeros(4, dtype=torch.long)
    path = torch.tensor([[0, 1, 1], [1, 3, 0], [2, 0, 0], [2, 0, 0]])
    for level in range(3):
        node = trie.child(level, node, path[:, level])[1]
    valid = torch.tensor([[True, True, True, False]])
    assert trie.items_of(node[None], valid, 6).tolist() == [[1, 3, 5, 4, 2, 0]]
    assert trie.items_of(node[None], valid, 2).tolist() == [[1, 3]]


def test_beam_search_is_exact_when_wide_and_never_leaves_the_trie():
    codes = random_codes(9, 2)
    trie = CodeTrie(make_sids(codes, SIZES).codes, SIZES)
    gen = torch.Generator().manual_seed(0)
    b = 3
    tables = [torch.randn(b, *SIZES[: l + 1], generator=gen) for l in range(len(SIZES))]  # logits given a prefix
    rows_codes = {}

    def step(level, last, parents):
        # A toy "model" whose logits depend on the user and the prefix; it tracks prefixes like a KV cache would.
        if level == 0:
            rows_codes["p"] = torch.zeros(b, 0, dtype=torch.long)
            rows_codes["u"] = torch.arange(b)
            return tables[0]
        rows_codes["p"] = torch.cat([rows_codes["p"][parents], last[:, None]], 1)
        rows_codes["u"] = rows_codes["u"][parents]
        p, u = rows_codes["p"], rows_codes["u"]
        return tables[level][(u, *p.T)]

    unique = {tuple(c) for c in codes.tolist()}
    result = beam_search(step, trie, b, beam_width=len(unique))
    for u in range(b):
        def logp(code):
            return sum(float(tables[l][(u, *code[:l])].log_softmax(-1)[code[l]]) for l in range(len(SIZES)))
        expected = sorted(unique, key=lambda c: -logp(c))
        got = [tuple(c) for c in result.codes[u].tolist()]
        assert got == expected
        assert result.scores[u].tolist() == pytest.approx([logp(c) for c in expected], abs=1e-5)
    # Narrow beams: every finite-score beam is an existing code.
    narrow = beam_search(step, trie, b, beam_width=2)
    assert narrow.valid.all()
    assert trie.contains(narrow.codes.view(-1, 3)).all()
