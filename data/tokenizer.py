"""
A small byte-level BPE trained on the toy world's corpus, loaded as a `tiktoken.Encoding`.

Training (minbpe-style): split text into chunks with the regex below, count each distinct chunk
once with its frequency, then repeatedly merge the most frequent adjacent pair of tokens.
The ranks are saved in tiktoken's own file format (`base64(token bytes) rank` a line), so
loading needs no network. Retrain with `python -m data.tokenizer` (deterministic).
"""
import base64
import hashlib
import random
import re
from collections import Counter
from pathlib import Path

import tiktoken

from data import world

RANKS_FILE = Path(__file__).parent / "bpe.tiktoken"
# GPT-2's split with ASCII classes (the world is ASCII), digits one per token so numbers stay legible,
# and a placeholder's head ("[HAZARD-ITEM-") kept whole so it can become a single token
PAT_STR = r""" ?\[[A-Z]+-[A-Z]+-|'(?:s|t|re|ve|m|ll|d)| ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+"""
VOCAB_SIZE = 768  # 256 bytes + 512 merges; the 4 special tokens come on top


def merge(ids, pair, idx):
    """Replace every occurrence of pair in ids by idx: ids=[1, 2, 3, 1, 2], pair=(1, 2), idx=4 -> [4, 3, 4]."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(idx)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def train_bpe(text, vocab_size=VOCAB_SIZE):
    """-> mergeable ranks {token bytes: rank}, the first 256 being the single bytes."""
    chunks = Counter(re.findall(PAT_STR, text))
    words = {tuple(c.encode()): n for c, n in chunks.items()}
    ranks = {bytes([b]): b for b in range(256)}
    vocab = {b: bytes([b]) for b in range(256)}
    for idx in range(256, vocab_size):
        pairs = Counter()
        for w, n in words.items():
            for pair in zip(w, w[1:]):
                pairs[pair] += n
        if not pairs:
            break
        pair = max(pairs, key=lambda p: (pairs[p], -p[0], -p[1]))  # ties broken by the lower ids: deterministic
        vocab[idx] = vocab[pair[0]] + vocab[pair[1]]
        ranks[vocab[idx]] = idx
        words = {tuple(merge(list(w), pair, idx)): n for w, n in words.items()}
    return ranks


def save_ranks(ranks, path=RANKS_FILE):
    lines = [f"{base64.b64encode(tok).decode()} {rank}" for tok, rank in sorted(ranks.items(), key=lambda x: x[1])]
    path.write_text("\n".join(lines) + "\n")


def load_tokenizer(path=RANKS_FILE):
    """-> tiktoken.Encoding with the world's special tokens as single ids after the merges."""
    ranks = {}
    for line in Path(path).read_text().splitlines():
        tok, rank = line.split()
        ranks[base64.b64decode(tok)] = int(rank)
    specials = {s: len(ranks) + i for i, s in enumerate(world.SPECIALS)}
    return tiktoken.Encoding(name="craft-world", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=specials)


def tokenizer_hash(path=RANKS_FILE):
    """What checkpoints record, so that a model is never read with another tokenizer's ids."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def corpus(n=20000, seed=0):
    """Text to train on: traces of every kind of the world (training wrappers only)."""
    rng = random.Random(seed)
    traces = [world.harmful_trace(rng, world.harmful_prompt(rng, rng.choice([None, world.TRAIN_WRAPPERS])),
                                  rng.choice(["safe", "unsafe", "rethink"]), rng.random() < 0.5) for _ in range(n // 2)]
    traces += [world.helpful_trace(rng, rng.choice([world.scary_prompt, world.benign_prompt])(rng)) for _ in range(n // 2)]
    text = "\n".join(t.text() for t in traces)
    for s in world.SPECIALS:  # special tokens get ids of their own, never merges
        text = text.replace(s, " ")
    return text


if __name__ == "__main__":
    save_ranks(train_bpe(corpus()))
    print(f"wrote {RANKS_FILE} (hash {tokenizer_hash()})")
