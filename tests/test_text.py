"""Text encoding against diffusers' SanaVideoPipeline.encode_prompt (a tiny random Gemma2 + a word-level tokenizer
saved in the diffusers layout), the long/empty prompt rules, and the prompt cache."""

from __future__ import annotations

import threading

import pytest
import torch

from longsana.text import (CHI_DIFFUSERS_VIDEO, CHI_SANA, MAX_PROMPT_CHARS, NEGATIVE_PROMPT, PromptCache,
                           PromptRecipe, TextEncoder, build_gemma2, build_word_tokenizer, motion_suffix)
from longsana.testing import needs_cuda, rel_err

PROMPTS = [
    "A red fox runs through fresh snow at dawn, its breath visible in the cold air.",
    "Waves crash against black rocks; seagulls circle above the foam.",
    "a small boat",
]
DIFFUSERS = PromptRecipe(chi=CHI_DIFFUSERS_VIDEO, lowercase=True)
CPU = torch.device("cpu")


def fill(n_tokens: int) -> str:
    """A prompt of exactly `n_tokens` word tokens."""
    words = "the quiet river bends past old stone mills under a grey sky".split()
    return " ".join(words[i % len(words)] for i in range(n_tokens))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("model")
    texts = [*CHI_SANA, *CHI_DIFFUSERS_VIDEO, *PROMPTS, NEGATIVE_PROMPT, fill(12), motion_suffix(30)]
    tok = build_word_tokenizer(texts + [t.lower() for t in texts], lowercase=False)  # case matters: tests lowercase
    tok.save_pretrained(root / "tokenizer")
    build_gemma2(len(tok), hidden_size=32, num_layers=2).save_pretrained(root / "text_encoder")
    return root


@pytest.fixture(scope="module")
def pipe(folder):
    from diffusers import SanaVideoPipeline
    from transformers import AutoModel, AutoTokenizer

    return SanaVideoPipeline(tokenizer=AutoTokenizer.from_pretrained(folder / "tokenizer"),
                             text_encoder=AutoModel.from_pretrained(folder / "text_encoder"),
                             vae=None, transformer=None, scheduler=None)


def reference(pipe, prompts, motion_score=None, chi=CHI_DIFFUSERS_VIDEO, negative=None):
    """diffusers: the caller appends the motion score; chi=() means no CHI; the negative prompt (no CHI) is encoded
    only when given."""
    return pipe.encode_prompt([p + motion_suffix(motion_score) for p in prompts], negative is not None, negative,
                              device=CPU, complex_human_instruction=list(chi))


def check(out, ref):
    (emb, mask), (ref_emb, ref_mask) = out, ref
    assert emb.shape == ref_emb.shape and emb.shape[1] == 300
    assert torch.equal(mask, ref_mask)
    assert rel_err(emb, ref_emb) <= 1e-5


def test_matches_diffusers_with_and_without_chi(folder, pipe):
    enc = TextEncoder.from_pretrained(folder, recipe=DIFFUSERS)
    assert enc.dtype == torch.float32 and enc.device == CPU and enc.dim == 32
    emb, mask, neg, neg_mask = reference(pipe, PROMPTS, 30, negative=NEGATIVE_PROMPT)
    check(enc.encode(PROMPTS, motion_score=30), (emb, mask))
    check(enc.encode([NEGATIVE_PROMPT], use_chi=False), (neg[:1], neg_mask[:1]))  # negative: no CHI
    emb, mask, neg, neg_mask = reference(pipe, PROMPTS[:1], 10, chi=(), negative="")
    check(enc.encode(PROMPTS[:1], motion_score=10, use_chi=False), (emb, mask))
    # diffusers' default negative prompt is "": allowed only on request
    check(enc.encode([""], use_chi=False, allow_empty=True), (neg, neg_mask))


def test_original_recipe(folder, pipe):
    """The original CHI, no lower-casing: equals diffusers given the same CHI on an already lower-case prompt."""
    enc = TextEncoder.from_pretrained(folder)
    assert enc.recipe.chi == CHI_SANA and not enc.recipe.lowercase
    lower = [p.lower() for p in PROMPTS[:2]]
    check(enc.encode(lower, motion_score=10), reference(pipe, lower, 10, chi=CHI_SANA)[:2])
    # and lower-casing is a real difference for a case-sensitive tokenizer
    emb, _ = enc.encode(PROMPTS[:1], 10, use_chi=False)
    lowered, _ = TextEncoder(enc.tokenizer, enc.model, PromptRecipe(lowercase=True)).encode(PROMPTS[:1], 10, False)
    assert rel_err(emb, lowered) > 1e-3


@pytest.mark.parametrize("use_chi", [True, False])
def test_long_prompt_fills_window_exactly_then_errors(folder, pipe, use_chi):
    enc = TextEncoder.from_pretrained(folder, recipe=DIFFUSERS)
    suffix = len(enc.tokenizer(motion_suffix(30).strip()).input_ids) - 1  # 5 tokens: motion score : 30 .
    # The window keeps 299 positions after BOS; with CHI the first is the CHI's last token (this tokenizer has no
    # trailing-space token to merge), so 298 prompt tokens fit; without CHI all 299.
    room = 298 if use_chi else 299
    fits = fill(room - suffix)
    emb, mask = enc.encode([fits, PROMPTS[0]], motion_score=30, use_chi=use_chi)
    assert mask[0].all() and not mask[1].all()
    check((emb, mask), reference(pipe, [fits, PROMPTS[0]], 30, chi=CHI_DIFFUSERS_VIDEO if use_chi else ())[:2])
    with pytest.raises(ValueError, match=r"prompt 1 is too long: 1 token\(s\) past the 300-token"):
        enc.encode([PROMPTS[0], fill(room - suffix + 1)], motion_score=30, use_chi=use_chi)


def test_bad_prompts(folder):
    enc = TextEncoder.from_pretrained(folder)
    for bad in ["", "   \n\t"]:
        with pytest.raises(ValueError, match="empty prompt"):
            enc.encode([PROMPTS[0], bad])
    with pytest.raises(ValueError, match=f"the limit is {MAX_PROMPT_CHARS}"):
        enc.encode(["a" * (MAX_PROMPT_CHARS + 1)])
    with pytest.raises(TypeError, match="must be a str"):
        enc.encode([None])
    with pytest.raises(ValueError, match=r"the prompt: not valid UTF-8 text \(a lone surrogate U\+D800"):
        enc.encode(["a fox \ud800"])  # valid JSON can hold it; the tokenizer would fail with a TypeError
    with pytest.raises(ValueError, match="no prompts"):
        enc.encode([])
    for score in [0, -3, 2.5, True]:
        with pytest.raises(ValueError, match="motion_score"):
            enc.encode(PROMPTS[:1], motion_score=score)


@needs_cuda
def test_the_embedding_table_stays_on_the_host_beside_a_gpu(folder, pipe):
    """The token embedding table is kept in host memory (1.2 GB of GPU memory at 2B), the decoder on the GPU; the
    output is diffusers' all the same."""
    enc = TextEncoder.from_pretrained(folder, "cuda", torch.float32, recipe=DIFFUSERS)
    assert enc.model.get_input_embeddings().weight.device == CPU and enc.device.type == "cuda"
    emb, mask = enc.encode(PROMPTS, motion_score=30)
    assert emb.device.type == "cuda"
    check((emb.cpu(), mask.cpu()), reference(pipe, PROMPTS, 30)[:2])


def test_loading(folder, tmp_path):
    from transformers import Gemma2ForCausalLM

    enc = TextEncoder.from_pretrained(folder / "text_encoder", "cpu", torch.bfloat16, tokenizer=folder / "tokenizer")
    emb, mask = enc.encode(PROMPTS[2], motion_score=10, use_chi=False)  # a single str is one prompt
    assert emb.dtype == torch.bfloat16 and emb.shape == (1, 300, 32) and mask.dtype == torch.int64
    ref, _ = TextEncoder.from_pretrained(folder).encode(PROMPTS[2:], motion_score=10, use_chi=False)
    assert rel_err(emb, ref) <= 2e-2
    lm = Gemma2ForCausalLM(enc.model.config)  # the original checkpoint kind: its decoder is what gets loaded
    lm.model.load_state_dict(TextEncoder.from_pretrained(folder).model.state_dict())
    lm.save_pretrained(tmp_path / "lm")
    from_lm = TextEncoder.from_pretrained(tmp_path / "lm", tokenizer=folder / "tokenizer")
    assert torch.equal(from_lm.encode(PROMPTS[2:], 10, use_chi=False)[0], ref)
    with pytest.raises(FileNotFoundError, match="no folder .*text_encoder"):
        TextEncoder.from_pretrained(tmp_path)
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match=r"llama.config\.json: model_type 'llama', expected 'gemma2'"):
        TextEncoder.from_pretrained(tmp_path / "llama", tokenizer=folder / "tokenizer")


class Counting:
    """A TextEncoder stand-in recording its calls (to see cache hits) and returning random embeddings."""

    def __init__(self):
        self.calls = 0
        self.lock = threading.Lock()

    def encode(self, prompts, motion_score=None, use_chi=True):
        with self.lock:
            self.calls += 1
        return torch.randn(len(prompts), 300, 8), torch.ones(len(prompts), 300, dtype=torch.long)


def test_cache_hit_and_eviction(folder):
    enc = TextEncoder.from_pretrained(folder)
    derived = []
    cache = PromptCache(enc, derive=lambda emb, mask: derived.append(emb) or len(derived), capacity=2)
    a = cache.get(PROMPTS[0], motion_score=10, use_chi=False)
    ref, ref_mask = enc.encode(PROMPTS[:1], motion_score=10, use_chi=False)
    assert torch.equal(a.emb, ref) and torch.equal(a.mask, ref_mask) and a.ctx == 1
    assert cache.get(PROMPTS[0], motion_score=10, use_chi=False) is a and len(derived) == 1  # hit: no encoding

    count = Counting()
    cache = PromptCache(count, derive=lambda emb, mask: object(), capacity=2)
    a = cache.get("a")
    cache.get("b")
    assert cache.get("a", motion_score=None) is a and count.calls == 2
    assert cache.get("a", motion_score=10) is not a and cache.get("a", use_chi=False) is not a  # distinct keys
    assert count.calls == 4 and len(cache) == 2
    c, a2 = cache.get("c"), cache.get("a")  # "a" (no score) was evicted by the two newer keys
    assert count.calls == 6 and a2 is not a and a2.ctx is not a.ctx
    assert cache.get("c") is c and count.calls == 6  # "c" recently used: kept
    cache.clear()
    assert len(cache) == 0 and cache.get("c") is not c and count.calls == 7  # encoded again; c itself unchanged
    assert c.emb.shape == (1, 300, 8)
    with pytest.raises(ValueError, match="capacity"):
        PromptCache(count, capacity=0)


def test_cache_threads():
    count = Counting()
    cache = PromptCache(count, capacity=4)
    keys = ["a", "b", "c", "d"]
    results, errors = {k: [] for k in keys}, []
    start = threading.Barrier(8)

    def worker(i):
        try:
            start.wait()
            for j in range(200):
                k = keys[(i + j) % 4]
                results[k].append(cache.get(k))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(len({id(e) for e in results[k]}) == 1 for k in keys)  # one object per key, even under races
    assert 4 <= count.calls <= 4 * 8 and len(cache) == 4

    small = PromptCache(Counting(), capacity=2)  # constant eviction under contention
    threads = [threading.Thread(target=lambda i=i: [small.get(keys[(i + j) % 4]) for j in range(100)])
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(small) == 2
