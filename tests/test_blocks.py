"""Blocks: attention against a hand-written softmax attention, transformer layers against
torch's own `nn.TransformerEncoderLayer`, masking, co-attention, embeddings, image towers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vlforge.train.blocks import (
    Attention,
    CausalTextTransformer,
    CoAttentionLayer,
    ModifiedResNet,
    Pooler,
    RegionEmbeddings,
    TextEmbeddings,
    TransformerLayer,
    VisionTransformer,
    attention_mask,
    prepend_global_region,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: OpenMP threads cost more than they give, and spin on a shared machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def naive_attention(att: Attention, x, ctx, allowed):
    """Softmax attention written out: heads, 1/√d scaling, −∞ on disallowed keys."""
    b, n, _ = x.shape
    h = att.heads
    q = att.q(x).view(b, n, h, -1).transpose(1, 2)
    k = att.k(ctx).view(b, ctx.shape[1], h, -1).transpose(1, 2)
    v = att.v(ctx).view(b, ctx.shape[1], h, -1).transpose(1, 2)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    out = (s.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1)
    return att.o(out)


def test_attention_matches_naive_with_padding_and_causal_masks():
    torch.manual_seed(0)
    att = Attention(16, 4).eval()
    x = torch.randn(2, 5, 16)
    keys = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    for causal in (False, True):
        mask = attention_mask(keys, causal=causal, query_len=5)
        want = naive_attention(att, x, x, mask)
        torch.testing.assert_close(att(x, mask=mask), want, atol=1e-5, rtol=0)


def test_cross_attention_widths():
    att = Attention(8, 2, kv_dim=12, inner_dim=16)
    x, ctx = torch.randn(2, 3, 8), torch.randn(2, 7, 12)
    torch.testing.assert_close(att(x, ctx), naive_attention(att, x, ctx, None), atol=1e-5, rtol=0)


def test_attention_mask_is_none_when_nothing_is_masked():
    assert attention_mask(torch.ones(2, 4)) is None
    assert attention_mask(None) is None
    m = attention_mask(None, causal=True, query_len=3)
    assert m is not None and m[0, 0].tolist() == [[True, False, False], [True, True, False],
                                                    [True, True, True]]  # fmt: skip


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_layer_matches_torch(norm_first):
    torch.manual_seed(0)
    ours = TransformerLayer(16, 4, 32, act="gelu", norm_first=norm_first, eps=1e-5).eval()
    ref = nn.TransformerEncoderLayer(
        16, 4, 32, dropout=0.0, activation="gelu", batch_first=True, norm_first=norm_first
    ).eval()
    with torch.no_grad():
        a = ours.attn
        ref.self_attn.in_proj_weight.copy_(torch.cat([a.q.weight, a.k.weight, a.v.weight]))
        ref.self_attn.in_proj_bias.copy_(torch.cat([a.q.bias, a.k.bias, a.v.bias]))
        ref.self_attn.out_proj.load_state_dict(a.o.state_dict())
        ref.linear1.load_state_dict(ours.mlp.fc1.state_dict())
        ref.linear2.load_state_dict(ours.mlp.fc2.state_dict())
        ref.norm1.load_state_dict(ours.norm1.state_dict())
        ref.norm2.load_state_dict(ours.norm2.state_dict())
    x = torch.randn(2, 6, 16)
    keys = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0]])
    want = ref(x, src_key_padding_mask=~keys.bool())
    got = ours(x, attention_mask(keys))
    real = keys.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0)


def test_ffn_is_a_separate_submodule_of_plain_linears():
    layer = TransformerLayer(8, 2, 16)
    assert isinstance(layer.mlp.fc1, nn.Linear) and isinstance(layer.mlp.fc2, nn.Linear)
    assert all(isinstance(getattr(layer.attn, n), nn.Linear) for n in "qkvo")


def test_coattention_exchanges_and_respects_masks():
    torch.manual_seed(0)
    co = CoAttentionLayer(16, 12, 24, 4, 32, 20).eval()
    t, v = torch.randn(2, 5, 16), torch.randn(2, 4, 12)
    v_keys = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    t2, v2 = co(t, v, None, attention_mask(v_keys))
    assert t2.shape == t.shape and v2.shape == v.shape
    # Text reads the image: changing a real region changes text; changing a padded one does not.
    v_pad = v.clone()
    v_pad[1, 3] += 5.0
    torch.testing.assert_close(co(t, v_pad, None, attention_mask(v_keys))[0], t2)
    v_real = v.clone()
    v_real[1, 0] += 5.0
    assert not torch.allclose(co(t, v_real, None, attention_mask(v_keys))[0][1], t2[1])


def test_text_embeddings():
    emb = TextEmbeddings(20, 8, max_len=6, type_vocab=2)
    assert emb(torch.randint(0, 20, (2, 6))).shape == (2, 6, 8)
    with pytest.raises(ValueError, match="positions"):
        emb(torch.zeros(1, 7, dtype=torch.long))


def test_region_embeddings_and_global_region():
    emb = RegionEmbeddings(10, 5, 8, part_norm=True)
    assert emb(torch.randn(2, 3, 10), torch.rand(2, 3, 5)).shape == (2, 3, 8)
    with pytest.raises(ValueError, match="geom"):
        emb(torch.randn(2, 3, 10))
    feats = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    geom = torch.rand(1, 3, 5)
    mask = torch.tensor([[1, 1, 0]])
    f, g, m = prepend_global_region(feats, geom, mask)
    assert f[0, 0].tolist() == [2.0, 3.0]  # padded region excluded from the mean
    assert g[0, 0].tolist() == [0.0, 0.0, 1.0, 1.0, 1.0] and m[0].tolist() == [1, 1, 1, 0]


def test_mask_embedding_marks_every_zeroed_region():
    emb = RegionEmbeddings(4, 0, 8, part_norm=True, mask_embedding=True)
    feats = torch.tensor([[[0.0] * 4, [1.0, 2.0, 3.0, 4.0], [0.0] * 4]])
    # masked+zeroed, masked+kept, zeroed in a row whose losses do not count (not in `masked`)
    masked = torch.tensor([[True, True, False]])
    seen = []
    emb.feat.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    emb(feats, masked=masked)
    torch.testing.assert_close(seen[0][0, 0], emb.mask.detach())
    torch.testing.assert_close(seen[0][0, 1], feats[0, 1])  # the 10% kept stay unmarked
    torch.testing.assert_close(seen[0][0, 2], emb.mask.detach())
    # Without it, that row would reach the part LayerNorm as a constant vector.
    out = emb(feats)
    assert torch.isfinite(out).all()


def test_pooler_takes_the_first_token():
    p = Pooler(4, 6, act="relu")
    h = torch.randn(2, 3, 4)
    torch.testing.assert_close(p(h), torch.relu(p.dense(h[:, 0])))


def test_image_towers():
    vit = VisionTransformer(16, 8, 12, 1, 2, 24, embed_dim=10)
    assert vit(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    with pytest.raises(ValueError, match="px"):
        vit(torch.randn(1, 3, 32, 32))
    rn = ModifiedResNet(32, (1, 1, 1, 1), 8, 2, embed_dim=10)
    assert rn(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="multiple of 32"):
        ModifiedResNet(40, (1, 1, 1, 1), 8, 2, embed_dim=10)


def test_text_tower_is_causal_and_pools_the_chosen_token():
    torch.manual_seed(0)
    tower = CausalTextTransformer(30, 8, 1, 2, 16, embed_dim=6, max_len=8).eval()
    ids = torch.tensor([[3, 4, 5, 6, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    assert tower.pooled_index(ids, mask).tolist() == [3]
    out = tower(ids, mask)
    changed = ids.clone()
    changed[0, 4] = 9  # a later (padded) token cannot reach the pooled position
    torch.testing.assert_close(tower(changed, mask), out)
    tower.pool, tower.eos_token_id = "eos", 5
    assert tower.pooled_index(ids, mask).tolist() == [2]
    tower.pool = "argmax"
    assert tower.pooled_index(ids, mask).tolist() == [3]
