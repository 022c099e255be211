import pytest
import torch
import torch.nn.functional as F

from genrec_dist.models import ModelConfig, available_models, build_model
from genrec_dist.models.blocks import TransformerStack, attention_mask, prefix_attention


def test_incremental_decoding_with_cache_equals_the_full_causal_pass():
    torch.manual_seed(0)
    stack = TransformerStack(2, 16, 2, 32).eval()
    x = torch.randn(3, 5, 16)
    full = stack(x, mask=attention_mask(None, causal=5))
    cache = stack.new_cache()
    prefill = stack(x[:, :2], mask=attention_mask(None, causal=2), cache=cache)
    steps = [stack(x[:, t: t + 1], cache=cache) for t in range(2, 5)]
    torch.testing.assert_close(torch.cat([prefill, *steps], dim=1), full)
    assert cache.length == 5


def test_beams_folded_into_queries_equal_a_repeated_memory():
    torch.manual_seed(0)
    dec = TransformerStack(1, 16, 2, 32, cross_attention=True).eval()
    memory = torch.randn(2, 7, 16)
    valid = torch.tensor([[True] * 7, [False] * 3 + [True] * 4])
    x = torch.randn(2 * 3, 4, 16)  # 3 beams per user, user-major
    causal = attention_mask(None, causal=4)
    folded = dec(x, mask=causal, memory=memory, memory_mask=attention_mask(valid))
    repeated = dec(x, mask=causal, memory=memory.repeat_interleave(3, 0),
                   memory_mask=attention_mask(valid.repeat_interleave(3, 0)))
    torch.testing.assert_close(folded, repeated)


@pytest.mark.parametrize("tq", [1, 3])
def test_prefix_attention_equals_one_softmax_over_the_repeated_prefix(tq):
    torch.manual_seed(0)
    bs, g, h, tp, ts, hd = 3, 4, 2, 6, 3, 8
    q = torch.randn(bs * g, h, tq, hd)
    k, v = torch.randn(bs * g, h, ts, hd), torch.randn(bs * g, h, ts, hd)
    pk, pv = torch.randn(bs, h, tp, hd) * 3, torch.randn(bs, h, tp, hd)  # * 3: scores far from uniform
    valid = torch.tensor([[True] * 6, [False] * 4 + [True] * 2, [False] * 6])  # full, short, fully padded history
    own = torch.ones(tq, ts, dtype=torch.bool).tril(ts - tq)  # new position i sees own keys up to itself
    bias = torch.zeros(bs, tp).masked_fill(~valid, float("-inf"))[:, None, None]
    got = prefix_attention(q, k, v, own, pk.transpose(-1, -2).contiguous(), pv, bias)
    mask = torch.cat([valid[:, None, None, :].expand(bs, 1, tq, tp).repeat_interleave(g, 0),
                      own.expand(bs * g, 1, tq, ts)], dim=-1)
    want = F.scaled_dot_product_attention(q, torch.cat([pk.repeat_interleave(g, 0), k], 2),
                                          torch.cat([pv.repeat_interleave(g, 0), v], 2), attn_mask=mask)
    torch.testing.assert_close(got, want)


def test_beams_decoding_after_a_shared_prefix_equal_the_full_pass():
    """Prefill a padded history per user, share it, then step 3 beams per user with beam reordering: every step
    equals the full causal pass over [history, that beam's tokens] with the history repeated per beam."""
    torch.manual_seed(0)
    stack = TransformerStack(2, 16, 2, 32).eval()
    b, g, tp = 2, 3, 5
    hist = torch.randn(b, tp, 16)
    valid = torch.tensor([[True] * 5, [False, False, False, True, True]])
    cache = stack.new_cache()
    stack(hist, mask=attention_mask(valid, causal=tp), cache=cache)
    cache.share_prefix(valid)
    nbytes = cache.nbytes
    new = torch.randn(b * g, 3, 16)  # the beams' tokens, before reordering
    order = [torch.arange(b).repeat_interleave(g), torch.tensor([2, 0, 0, 4, 5, 3]), torch.tensor([1, 1, 2, 3, 5, 4])]
    seq = torch.zeros(b * g, 0, 16)  # each row's tokens so far (reference)
    row_user = torch.arange(b)
    for step, parents in enumerate(order):
        cache.reorder(parents)
        seq, row_user = torch.cat([seq[parents] if step else seq, new[:, step: step + 1]], 1), row_user[parents]
        got = stack(new[:, step: step + 1], cache=cache)[:, -1]
        full_valid = torch.cat([valid[row_user], torch.ones(b * g, step + 1, dtype=torch.bool)], 1)
        full = stack(torch.cat([hist[row_user], seq], 1), mask=attention_mask(full_valid, causal=tp + step + 1))
        torch.testing.assert_close(got, full[:, -1])
    assert cache.length == tp + 3
    # The prefix stays at the user batch size; only the beams' own 3 positions are held per beam.
    assert cache.layers[0]["prefix"]["v"].shape[0] == b and cache.layers[0]["self"]["v"].shape[:3] == (b * g, 2, 3)
    assert cache.nbytes == nbytes + 2 * 2 * (b * g) * 16 * 3 * 4  # layers x (k, v) x rows x width x steps x fp32


def test_fully_padded_keys_stay_finite():
    mask = attention_mask(torch.zeros(2, 4, dtype=torch.bool), causal=4)
    assert mask.all()  # rows with no key get every key instead of NaN
    mixed = attention_mask(torch.tensor([[False, False, True, True]]), causal=4)
    assert mixed[0, 0, 3].tolist() == [False, False, True, True]  # real rows never see padding


def test_registry():
    assert {"tiger", "sasrec"} <= set(available_models())
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        build_model("nope", ModelConfig(), 10)


@pytest.mark.parametrize("name", ["tiger", "sasrec"])
def test_models_run_in_bf16(name, gen):
    """DeepSpeed trains in bf16 on GPU: losses stay float32, beam search and top-k still return real items."""
    import numpy as np

    from genrec_dist.models.config import SASRecConfig, TigerConfig
    from toys import make_sids, successor_batch

    n = 20
    ids = np.arange(n)
    sids = make_sids(np.stack([ids // 5, ids % 5], axis=1), [4, 5])
    cfg = ModelConfig(tiger=TigerConfig(d_model=16, n_heads=2, head_dim=8, d_ff=32, encoder_layers=1,
                                        decoder_layers=1, max_history=6, beam_width=4),
                      sasrec=SASRecConfig(d_model=16, n_heads=2, n_layers=1, d_ff=32, max_history=6))
    model = build_model(name, cfg, n, sids).to(torch.bfloat16)
    history, target = successor_batch(n, 4, 5, gen)
    loss = model(history, target)["loss"]
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    rec = model.recommend(history, 5)
    assert ((rec >= 1) & (rec <= n)).all() and all(len(set(r)) == 5 for r in rec.tolist())
