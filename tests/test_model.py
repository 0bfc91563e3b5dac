import torch

from model import GPT, GPTConfig, attention_mask, positions, sample_next

CFG = GPTConfig(vocab_size=50, block_size=48, n_layer=3, n_head=2, n_embd=16)


def tiny(seed=0):
    torch.manual_seed(seed)
    return GPT(CFG).eval()


def test_taps_equal_a_manual_pass_through_the_blocks():
    m = tiny()
    idx = torch.randint(50, (2, 10))
    logits, _, taps = m(idx, taps=(0, 1, 2, 3))
    x = m.transformer.wte(idx) + m.transformer.wpe(torch.arange(10))
    assert torch.allclose(taps[0], x)
    for i, block in enumerate(m.transformer.h, start=1):
        x = block(x)
        assert torch.allclose(taps[i], x, atol=1e-6)
    assert torch.allclose(m.lm_head(m.transformer.ln_f(taps[3])), logits, atol=1e-6)


def test_no_taps_means_an_empty_dict():
    assert tiny()(torch.randint(50, (1, 5)))[2] == {}


def test_attention_matches_an_explicit_softmax():
    m = tiny()
    attn = m.transformer.h[0].attn
    x = torch.randn(2, 7, 16)
    q, k, v = attn.c_attn(x).split(16, dim=2)
    q, k, v = (t.view(2, 7, 2, 8).transpose(1, 2) for t in (q, k, v))
    scores = (q @ k.transpose(-1, -2)) / 8 ** 0.5
    scores = scores.masked_fill(torch.triu(torch.ones(7, 7, dtype=torch.bool), 1), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 7, 16)
    assert torch.allclose(attn(x), attn.c_proj(y), atol=1e-6)


def left_padded_batch():
    prompts = [torch.randint(50, (n,)) for n in (3, 7, 5)]
    T = 7
    idx = torch.zeros(3, T, dtype=torch.long)
    real = torch.zeros(3, T, dtype=torch.bool)
    for i, p in enumerate(prompts):
        idx[i, T - len(p):], real[i, T - len(p):] = p, True
    return prompts, idx, real


def test_cached_generation_equals_uncached_on_a_ragged_batch():
    m = tiny()
    _, idx, real = left_padded_batch()
    cached, new_c = m.generate(idx, 12, temperature=0, real=real, use_cache=True)
    plain, new_p = m.generate(idx, 12, temperature=0, real=real, use_cache=False)
    assert torch.equal(cached, plain) and torch.equal(new_c, new_p)
    # logits too: one cached step against the full recomputation
    full = torch.cat([real, torch.ones(3, 12, dtype=torch.bool)], 1)
    ref_logits = m(cached, doc=full)[0]
    cache = [[] for _ in m.transformer.h]
    step_logits = [m(cached[:, :7], doc=full[:, :7], cache=cache)[0][:, -1]]
    for t in range(7, 18):
        step_logits.append(m(cached[:, t:t + 1], doc=full[:, :t + 1], cache=cache)[0][:, -1])
    assert torch.allclose(torch.stack(step_logits, 1), ref_logits[:, 6:18], atol=1e-5)


def test_one_by_one_equals_batched():
    m = tiny()
    prompts, idx, real = left_padded_batch()
    batched, _ = m.generate(idx, 10, temperature=0, real=real)
    for i, p in enumerate(prompts):
        alone, _ = m.generate(p[None], 10, temperature=0)
        assert torch.equal(alone[0, -10:], batched[i, -10:])


def test_on_step_sees_each_token_with_its_taps_and_can_write_other_tokens():
    m = tiny()
    _, idx, real = left_padded_batch()
    for use_cache in (True, False):
        seen = []

        def hook(tokens_in, hidden, nxt):
            seen.append((tokens_in, hidden[1]))
            return torch.full_like(nxt, 3) if len(seen) == 2 else nxt  # force token 3 at the second step
        out, _ = m.generate(idx, 5, temperature=0, real=real, use_cache=use_cache, taps=(1,), on_step=hook)
        assert (out[:, 8] == 3).all()
        assert torch.equal(torch.cat([t for t, _ in seen], 1), out[:, :-1])  # every token went in once, in order
        full = m(out, doc=torch.cat([real, torch.ones(3, 5, dtype=torch.bool)], 1), taps=(1,))[2][1]
        assert torch.allclose(torch.cat([h for _, h in seen], 1), full[:, :-1], atol=1e-5)


def test_a_packed_row_computes_each_document_as_if_it_were_alone():
    m = tiny()
    docs = [torch.randint(50, (n,)) for n in (5, 9, 3)]
    row = torch.cat(docs)[None]
    doc = torch.cat([torch.full((len(d),), i + 1) for i, d in enumerate(docs)])[None]
    packed, _, taps = m(row, doc=doc, taps=(2,))
    at = 0
    for d in docs:
        alone, _, alone_taps = m(d[None], taps=(2,))
        assert torch.allclose(packed[:, at:at + len(d)], alone, atol=1e-5)
        assert torch.allclose(taps[2][:, at:at + len(d)], alone_taps[2], atol=1e-5)
        at += len(d)


def test_positions_restart_at_each_document():
    doc = torch.tensor([[0, 0, 1, 1, 1], [1, 2, 2, 3, 0]])
    assert positions(doc).tolist() == [[0, 1, 0, 1, 2], [0, 0, 1, 0, 0]]
    # the docstring's examples: a left-padded row and a packed row
    assert attention_mask(torch.tensor([[0, 1, 1]]), 3)[0, 0].int().tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    assert attention_mask(torch.tensor([[1, 1, 2]]), 3)[0, 0].int().tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]


def test_rows_stop_at_the_end_token():
    m = tiny()
    _, idx, real = left_padded_batch()
    first, _ = m.generate(idx, 1, temperature=0, real=real)
    end = int(first[0, -1])  # row 0's first greedy token becomes the end token
    out, new = m.generate(idx, 6, temperature=0, real=real, end_token=end)
    assert new[0].sum() == 1 and out[0, 7] == end


def test_overfitting_one_batch_drives_the_loss_near_zero():
    m = tiny()
    m.train()
    x = torch.randint(50, (4, 16))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for _ in range(150):
        _, loss, _ = m(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


def test_state_dict_reloads_with_weights_only(tmp_path):
    m = tiny()
    torch.save(m.state_dict(), tmp_path / "m.pt")
    m2 = tiny(seed=1)
    m2.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    idx = torch.randint(50, (2, 9))
    assert torch.equal(m(idx)[0], m2(idx)[0])


def test_sampling_with_top_k_only_picks_the_top_tokens():
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0]]).repeat(200, 1)
    picks = sample_next(logits, torch.rand(200, 1, generator=torch.Generator().manual_seed(0)), top_k=2)
    assert set(picks.flatten().tolist()) <= {1, 2}


def test_sampling_draws_each_token_with_its_probability():
    p = torch.tensor([0.5, 0.0, 0.2, 0.25, 0.05])
    n = 20000
    picks = sample_next(p.log()[None].repeat(n, 1), torch.rand(n, 1, generator=torch.Generator().manual_seed(0)))
    counts = torch.bincount(picks.flatten(), minlength=5).float()
    assert counts[1] == 0  # probability 0: never
    assert ((counts - n * p).abs() <= 5 * (n * p * (1 - p)).sqrt()).all()  # within 5 binomial sds
    # the edges of u: 0 picks the first token with any probability, just below 1 the last one
    assert sample_next(p.log()[None].repeat(2, 1), torch.tensor([[0.0], [1 - 1e-7]])).flatten().tolist() == [0, 4]


def test_a_rows_samples_do_not_depend_on_when_the_others_end():
    m = tiny()
    _, idx, real = left_padded_batch()
    first, _ = m.generate(idx, 1, real=real, generator=torch.Generator().manual_seed(1))
    end = int(first[1, -1])  # row 1's first sampled token: with it as the end, row 1 leaves at once
    free, _ = m.generate(idx, 8, real=real, generator=torch.Generator().manual_seed(1))
    ended, new = m.generate(idx, 8, real=real, end_token=end, generator=torch.Generator().manual_seed(1))
    assert new[1].sum() == 1
    for i in (0, 2):  # the other rows draw the same tokens, up to their own end
        n = int(new[i].sum())
        assert torch.equal(ended[i, 7:7 + n], free[i, 7:7 + n])
