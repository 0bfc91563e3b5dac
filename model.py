"""
A GPT-2-shaped language model, small enough to read in one sitting.

References: Radford et al. 2019, "Language Models are Unsupervised Multitask Learners" (GPT-2);
Karpathy's nanoGPT, whose model.py this file follows part by part.

Three additions, none of which knows anything about safety:
- activation taps: forward() returns the residual stream after the blocks you name;
- batched generation with a KV cache, for prompts of different lengths (left padding);
- several documents in one row (packed pretraining), each attending to itself only.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 772  # the toy world's tokenizer: 768 bytes and merges + 4 special tokens
    block_size: int = 160  # longest sequence the position table covers
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm, as in GPT-2


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.n_head, self.dropout, self.block_size = cfg.n_head, cfg.dropout, cfg.block_size

    def forward(self, x, mask=None, cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:  # keys and values of earlier steps, kept so each step only computes its own
            if not cache:  # the first step makes room for a whole block: later steps write in place, no copies
                size = (B, self.n_head, self.block_size, C // self.n_head)
                cache[:] = [k.new_empty(size), v.new_empty(size), 0]
            k_all, v_all, n = cache
            k_all[:, :, n:n + T], v_all[:, :, n:n + T] = k, v
            cache[2] = n = n + T
            k, v = k_all[:, :, :n], v_all[:, :, :n]  # (B, nh, T_past + T, hs)
        p = self.dropout if self.training else 0.0
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x, mask=None, cache=None):
        x = x + self.attn(self.ln_1(x), mask, cache)
        return x + self.mlp(self.ln_2(x))


def attention_mask(doc, T):
    """(B, T_total) document ids -> (B, 1, T, T_total) bool for the last T queries: a token sees the
    earlier tokens of its own document only. Example, one left-padded row, doc=[0, 1, 1], T=3 ->
    [[1, 0, 0], [0, 1, 0], [0, 1, 1]]; a packed row, doc=[1, 1, 2] -> [[1, 0, 0], [1, 1, 0], [0, 0, 1]]."""
    T_total = doc.size(1)
    q = torch.arange(T_total - T, T_total, device=doc.device)[:, None]
    k = torch.arange(T_total, device=doc.device)[None, :]
    allowed = (k <= q) & (doc[:, None, :] == doc[:, -T:, None])
    return allowed[:, None]


def positions(doc):
    """(B, T) document ids -> (B, T) positions that restart at 0 where each document starts."""
    t = torch.arange(doc.size(1), device=doc.device).expand_as(doc)
    starts = torch.ones_like(doc, dtype=torch.bool)
    starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
    return t - torch.where(starts, t, 0).cummax(1).values  # t minus the start of t's document


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
            ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied input and output embeddings
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None, taps=(), doc=None, cache=None):
        """idx (B, T) token ids. Returns logits (B, T, V), the loss if targets are given (-1 = ignore),
        and taps: {layer: residual stream (B, T, C)}, layer 0 = embeddings, layer i = after block i.
        doc (B, T_past + T): which document each token belongs to, for rows that hold more than one
        sequence: left padding (padding = False, the prompt = True) or packed traces (1, 1, 2, 2, 2, ...).
        cache: a list per block, filled in place: [keys, values, how many positions are filled]."""
        B, T = idx.size()
        if doc is None:  # one sequence per row: plain causal attention
            assert cache is None, "cached decoding needs the document ids"
            pos, mask = torch.arange(T, device=idx.device), None
        else:  # several: attention stays inside each document, and positions restart in each
            pos, mask = positions(doc)[:, -T:], attention_mask(doc, T)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        out = {0: x} if 0 in taps else {}
        for i, block in enumerate(self.transformer.h, start=1):
            x = block(x, mask, None if cache is None else cache[i - 1])
            if i in taps:
                out[i] = x
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss, out

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, real=None, end_token=None,
                 use_cache=True, generator=None, taps=(), on_step=None):
        """Continue a batch of left-padded prompts. idx (B, T0); real (B, T0) True on real tokens.
        temperature 0 means greedy. A row stops at end_token: after it the row holds end_token, and
        once a quarter of the rows still computed have stopped, they leave the batch (and the cache).
        on_step(tokens_in, hidden, nxt) -> nxt, if given, sees every step: the tokens that just went in
        (the prompt first, then one token a step), their taps {layer: (B, T_in, C)} from that same forward
        pass, and the sampled next tokens (B, 1); it may return other tokens to write instead. It always
        sees all B rows: a row that left the batch reads end_token with zero hidden states. Each row draws
        its own uniform number every step, also after it left, so its tokens do not depend on the others'.
        Returns tokens (B, T0 + steps) and new (B, T0 + steps), steps ≤ max_new_tokens (fewer when every
        row ends sooner): new is True on generated tokens up to and including the end."""
        B, T0 = idx.shape
        if T0 + max_new_tokens > self.config.block_size:
            raise ValueError(f"prompt of {T0} tokens + {max_new_tokens} new exceeds block_size "
                             f"{self.config.block_size}")
        fill = 0 if end_token is None else end_token
        tokens = idx.new_full((B, T0 + max_new_tokens), fill)
        tokens[:, :T0] = idx
        doc = torch.ones_like(tokens, dtype=torch.bool)  # left padding False, the rest True
        doc[:, :T0] = True if real is None else real
        new = torch.zeros_like(doc)
        rows = torch.arange(B, device=idx.device)  # the rows still computed
        alive = torch.ones(B, dtype=torch.bool, device=idx.device)  # rows that have not ended
        cache = [[] for _ in self.transformer.h] if use_cache else None
        n = T0  # tokens so far
        for _ in range(max_new_tokens):
            T_in = T0 if n == T0 else 1  # the tokens that go in: the prompt, then the newest one
            start = 0 if cache is None else n - T_in  # without the cache, the whole sequence again
            logits, _, hidden = self(tokens[rows, start:n], doc=doc[rows, :n], cache=cache, taps=taps)
            u = torch.rand(B, 1, generator=generator, device=idx.device)[rows]  # one draw a row
            nxt = sample_next(logits[:, -1], u, temperature, top_k)  # (rows, 1)
            if on_step is not None:
                seen = {layer: every_row(h[:, -T_in:], rows, B, 0) for layer, h in hidden.items()}
                nxt = on_step(tokens[:, n - T_in:n], seen, every_row(nxt, rows, B, fill))[rows]
            live = alive[rows]
            tokens[rows, n], new[rows, n] = torch.where(live, nxt[:, 0], fill), live
            n += 1
            if end_token is not None:
                alive[rows] = live & (nxt[:, 0] != end_token)
                if not alive.any():
                    break
                live = alive[rows]
                if live.sum() <= 0.75 * len(rows):  # the finished rows leave the batch
                    rows = rows[live]
                    for c in cache or ():
                        c[0], c[1] = c[0][live], c[1][live]
        return tokens[:, :n], new[:, :n]


def every_row(x, rows, B, fill):
    """x (len(rows), ...) for the rows still computed -> (B, ...), `fill` on the rows that left."""
    return x.new_full((B, *x.shape[1:]), fill).index_copy_(0, rows, x)


def sample_next(logits, u, temperature=1.0, top_k=None):
    """(B, V) logits and u (B, 1) uniform in [0, 1) -> (B, 1) token ids, greedy when temperature is
    0. Inverse-CDF sampling: the first token whose cumulative probability exceeds u (a token of
    probability 0 never does)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    cdf = F.softmax(logits.float(), dim=-1).cumsum(-1)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp(max=cdf.size(-1) - 1)
