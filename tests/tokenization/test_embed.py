"""The embedding UDF called directly: the real offline MiniLM, and the causal-LM path on a tiny random Llama."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from tokenization.embed import TextEmbedder, texts_for_embedding

TEXTS = ["Digital multimeter with auto range and backlight", "Multimeter, digital, auto-ranging, with backlight",
         "Nitrile gloves, powder free, box of 100", "Soldering iron station 60W"]


@pytest.fixture(scope="module")
def minilm():
    return TextEmbedder("sentence-transformers", "default", device="cpu")


def test_minilm_embeds_offline_and_deterministically(minilm):
    out = minilm({"item_id": np.array([4, 2, 9, 1]), "text": np.array(TEXTS, dtype=object)})
    emb = out["embedding"]
    assert emb.shape == (4, 384) and emb.dtype == np.float32
    assert list(out["item_id"]) == [4, 2, 9, 1]
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)  # the model's Normalize module
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] and sim[0, 1] > sim[0, 3]  # the two multimeters are nearest
    # A text's vector does not depend on its batch mates (what makes a retried batch reproduce the output).
    alone = minilm.embed([TEXTS[2]])[0]
    np.testing.assert_allclose(alone, emb[2], atol=1e-5)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A random-weight Llama and a WordLevel tokenizer trained here, both saved with save_pretrained."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-llama")
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(TEXTS, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


def test_causal_lm_mean_pools_real_tokens_only(tiny_llama):
    import torch
    from transformers import AutoModel, AutoTokenizer

    emb = TextEmbedder("causal-lm", tiny_llama, device="cpu")
    assert emb.model.dtype == torch.float32  # fp32 on CPU
    out = emb({"item_id": np.arange(1, 5), "text": np.array(TEXTS, dtype=object)})["embedding"]
    assert out.shape == (4, 32) and np.isfinite(out).all()
    # Reference: one text alone (no padding), plain mean of the last hidden states.
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModel.from_pretrained(tiny_llama).eval()
    for i in (2, 3):  # the shorter texts, padded in the batch
        enc = tok([TEXTS[i]], return_tensors="pt")
        with torch.no_grad():
            ref = model(input_ids=enc["input_ids"]).last_hidden_state[0].mean(0).numpy()
        np.testing.assert_allclose(out[i], ref, rtol=1e-4, atol=1e-5)
    assert not np.allclose(out[0], out[2])


def test_empty_text_fallback_and_error():
    items = pl.DataFrame({"item_id": [1, 2, 3], "item": ["a", "b", "c"], "title": ["T1", "  ", "T3"],
                          "text": ["some text", "   ", None]})
    texts, n = texts_for_embedding(items, "fallback")
    assert n == 2 and texts["text"].to_list() == ["some text", "item b", "T3"]
    with pytest.raises(ValueError, match=r"2 items have an empty or whitespace-only text \(item_id \[2, 3\]"):
        texts_for_embedding(items, "error")


@pytest.mark.gpu
def test_causal_lm_runs_bf16_on_gpu(tiny_llama):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    emb = TextEmbedder("causal-lm", tiny_llama)
    assert emb.device == "cuda" and emb.model.dtype == torch.bfloat16
    cpu = TextEmbedder("causal-lm", tiny_llama, device="cpu").embed(TEXTS)
    gpu = emb.embed(TEXTS)
    assert gpu.dtype == np.float32
    np.testing.assert_allclose(gpu, cpu, atol=0.1)  # bf16 precision
