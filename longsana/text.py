"""Prompt -> text conditioning: the Gemma-2 decoder run with SANA's prompt recipe, and a cache of encoded prompts.

The recipe (NVlabs/Sana `inference_video_scripts/inference_sana_video.py`; diffusers 0.42.1
`SanaVideoPipeline.encode_prompt` does the same):
  1. prompt.strip() + " motion score: N."   (the original script; diffusers leaves the suffix to the caller)
  2. prepend the "complex human instruction" (CHI): its lines joined by "\\n", glued to the prompt with no separator
  3. tokenize with BOS, right-pad to L_all = len(tokens(CHI)) + 300 - 2  (300 without CHI)
  4. run the decoder, take the last hidden state (after its final norm)
  5. keep positions [0] + [L_all - 299 .. L_all - 1]: BOS and the last 299 positions, and the same mask positions.
The original code's comment on the "- 2": "[bos], [_]": Gemma's tokenizer ends the CHI in a space token that
merges into the prompt's first word, so those 299 positions are exactly the prompt's tokens (plus padding).

Two things differ between the original code and diffusers, and are fields of `PromptRecipe`:
  - the CHI text: the original model config's image-worded `CHI_SANA` (the default) vs diffusers' video-worded
    `CHI_DIFFUSERS_VIDEO`;
  - lower-casing: diffusers lower-cases the prompt (`_text_preprocessing`), the original script does not.
The negative prompt of classifier-free guidance is encoded without CHI and without motion score (both codes).

Long prompts: the tokenizer would cut everything past L_all from the END, silently dropping the motion-score
suffix and the prompt's tail. We refuse instead: a prompt that does not fit the window raises ValueError saying by
how many tokens, as does one over MAX_PROMPT_CHARS characters (checked before tokenizing) or an empty one.

`PromptCache` keeps the last few prompts' embeddings and, optionally, an object derived from them (the
transformer's per-layer cross-attention K/V), so switching back to a recent prompt costs nothing.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import MAX_PROMPT_CHARS, check_text
from .loading import CheckpointError, default_device_dtype, read_json_object

TEXT_LEN = 300  # tokens the transformer sees: BOS + 299

# The original models' CHI (NVlabs/Sana configs/sana_video_config/*.yaml, `text_encoder.chi_prompt`, used in
# training and by the original inference scripts for SANA-Video 2B and LongSANA). Note the double quotes.
CHI_SANA = (
    'Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions suitable for '
    "image generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial "
    "relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping "
    "peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street "
    "lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass "
    "skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional "
    "commentary or evaluations:",
    "User Prompt: ",
)

# diffusers 0.42.1 SanaVideoPipeline.__call__ default `complex_human_instruction` (video-worded; the model was not
# trained with it). Use it, with lowercase=True, to reproduce diffusers' pipeline.
CHI_DIFFUSERS_VIDEO = (
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for "
    "video generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, motion, and "
    "temporal relationships to create vivid and dynamic scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat slowly settling into a curled position, "
    "peacefully falling asleep on a warm sunny windowsill, with gentle sunlight filtering through surrounding pots "
    "of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street "
    "lamps gradually lighting up, a diverse crowd of people in colorful clothing walking past, and a double-decker "
    "bus smoothly passing by towering glass skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional "
    "commentary or evaluations:",
    "User Prompt: ",
)

# The original inference scripts' negative prompt (CFG of the base model; encoded without CHI, no motion score).
NEGATIVE_PROMPT = (
    "A chaotic sequence with misshapen, deformed limbs in heavy motion blur, sudden disappearance, jump cuts, jerky "
    "movements, rapid shot changes, frames out of sync, inconsistent character shapes, temporal artifacts, jitter, "
    "and ghosting effects, creating a disorienting visual experience."
)


def motion_suffix(score: int | None) -> str:
    """" motion score: N." appended to the prompt (N = 10 for LongSANA, 30 in the base model's examples)."""
    if score is None:
        return ""
    if isinstance(score, bool) or not isinstance(score, int) or score < 1:
        raise ValueError(f"motion_score must be a positive int or None, got {score!r}")
    return f" motion score: {score}."


@dataclass(frozen=True)
class PromptRecipe:
    chi: tuple[str, ...] = CHI_SANA
    lowercase: bool = False  # diffusers: True
    length: int = TEXT_LEN


class TextEncoder:
    """A Gemma-2 decoder and its tokenizer, encoding prompts with `PromptRecipe`. Thread-safe."""

    def __init__(self, tokenizer, model: torch.nn.Module, recipe: PromptRecipe = PromptRecipe()):
        if tokenizer.pad_token_id is None or tokenizer.bos_token_id is None:
            raise ValueError("the tokenizer needs a pad token and a BOS token")
        self.tokenizer, self.model, self.recipe = tokenizer, model.eval().requires_grad_(False), recipe
        # The token embedding table stays in host memory (Gemma-2 2B's: 256k x 2304, 1.2 GB in bf16): a prompt looks
        # up a few hundred rows of it, and the GPU keeps the memory for streams. The same rows, so the same output.
        model.get_input_embeddings().to("cpu")
        self.chi_text = "\n".join(recipe.chi)
        self.chi_len = len(tokenizer(self.chi_text).input_ids)  # BOS included
        self._lock = threading.Lock()  # a Rust fast tokenizer must not be used by two threads at once

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, *, tokenizer: str | Path | None = None,
                        recipe: PromptRecipe = PromptRecipe()) -> TextEncoder:
        """`folder`: a diffusers model root holding text_encoder/ and tokenizer/, or (with `tokenizer` given) the
        text-encoder folder itself, which may also hold a Gemma2ForCausalLM (the original gemma-2-2b-it): its
        decoder is loaded. Defaults: cuda + bf16 where available, else cpu + fp32."""
        from safetensors import SafetensorError
        from transformers import AutoModel, AutoTokenizer

        folder = Path(folder)
        enc_dir, tok_dir = (folder, Path(tokenizer)) if tokenizer is not None else (folder / "text_encoder",
                                                                                  folder / "tokenizer")
        for d in (enc_dir, tok_dir):
            if not d.is_dir():
                raise FileNotFoundError(f"text encoder: no folder {d} (expected a diffusers model root with "
                                        "text_encoder/ and tokenizer/, or both folders given explicitly)")
        model_type = read_json_object(enc_dir / "config.json").get("model_type")  # named errors, not transformers'
        if model_type != "gemma2":
            raise ValueError(f"{enc_dir / 'config.json'}: model_type {model_type!r}, expected 'gemma2'")
        device, dtype = default_device_dtype(device, dtype)
        # Gemma2Model: the decoder without LM head (the original: AutoModelForCausalLM(...).get_decoder()). Gemma-2
        # runs eager attention in transformers (sdpa has no logit soft-capping). transformers reports a truncated
        # or missing weights file as an OSError or safetensors' own error, neither naming the folder.
        try:
            model = AutoModel.from_pretrained(enc_dir, dtype=dtype).to(device=device, dtype=dtype)
        except (OSError, SafetensorError) as e:
            raise CheckpointError(f"{enc_dir}: cannot load the text encoder's weights ({e})") from e
        try:
            tok = AutoTokenizer.from_pretrained(tok_dir)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{tok_dir}: cannot load the tokenizer ({e})") from e
        return cls(tok, model, recipe)

    @property
    def device(self) -> torch.device:
        """Where the decoder runs (its token embedding table is in host memory)."""
        return self.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def prepare(self, prompt: str, motion_score: int | None = None, allow_empty: bool = False) -> str:
        """The validated prompt text as it is tokenized after the CHI."""
        if not isinstance(prompt, str):
            raise TypeError(f"a prompt must be a str, got {type(prompt).__name__}")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ValueError(f"prompt too long: {len(prompt)} characters, the limit is {MAX_PROMPT_CHARS}")
        text = check_text(prompt, "the prompt").strip()
        if not text and not allow_empty:
            raise ValueError("empty prompt")
        return (text.lower() if self.recipe.lowercase else text) + motion_suffix(motion_score)

    def tokenize(self, prompts: list[str] | str, motion_score: int | None = None, use_chi: bool = True,
                 allow_empty: bool = False):
        """The padded token batch `encode` feeds the model (input_ids, attention_mask), made on the CPU: a caller can
        check a prompt without the device. Raises TypeError / ValueError for a bad prompt."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts to encode")
        texts = [self.prepare(p, motion_score, allow_empty) for p in prompts]
        L = self.recipe.length
        prefix, L_all = (self.chi_text, self.chi_len + L - 2) if use_chi else ("", L)
        with self._lock:
            tokens = self.tokenizer([prefix + t for t in texts])  # BOS + ids, unpadded
            for i, ids in enumerate(tokens.input_ids):
                if len(ids) > L_all:
                    raise ValueError(f"prompt {i} is too long: {len(ids) - L_all} token(s) past the {L}-token text "
                                     "window (motion-score suffix included); shorten it")
            return self.tokenizer.pad(tokens, padding="max_length", max_length=L_all, padding_side="right",
                                      return_tensors="pt")

    @torch.no_grad()
    def encode(self, prompts: list[str] | str, motion_score: int | None = None, use_chi: bool = True,
               allow_empty: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """-> emb (B, 300, C) in the encoder's dtype, mask (B, 300) int64 (1 = token), both on its device.

        The negative prompt of CFG: `encode([NEGATIVE_PROMPT], None, use_chi=False)`; `allow_empty` admits ""
        (diffusers' default negative prompt), which user prompts must never be.
        """
        batch = self.tokenize(prompts, motion_score, use_chi, allow_empty)
        L_all, L = batch.input_ids.shape[1], self.recipe.length
        embed, mask = self.model.get_input_embeddings(), batch.attention_mask.to(self.device)
        x = embed(batch.input_ids.to(embed.weight.device)).to(self.device)  # (the table may be wherever it was put)
        h = self.model(inputs_embeds=x, attention_mask=mask, use_cache=False).last_hidden_state  # (B, L_all, C)
        keep = torch.tensor([0, *range(L_all - L + 1, L_all)], device=self.device)  # BOS + the last L - 1
        return h[:, keep], mask[:, keep]


@dataclass(frozen=True)
class PromptEntry:
    emb: torch.Tensor  # (1, 300, C)
    mask: torch.Tensor  # (1, 300)
    ctx: Any = None  # derive(emb, mask), e.g. the transformer's TextKV


class PromptCache:
    """LRU of encoded prompts keyed by (prompt, motion_score, use_chi), bounded in count. Thread-safe.

        cache = PromptCache(encoder, derive=model.prepare_text)
        text_kv = cache.get(prompt, motion_score=10).ctx

    A hit returns the very same entry (no encoder or `derive` call). At 2B / 480p an entry with TextKV is about
    20 layers x 2 x 300 x 2240 bf16 = 54 MB, so keep `capacity` small.
    """

    def __init__(self, encoder: TextEncoder, derive: Callable[[torch.Tensor, torch.Tensor], Any] | None = None,
                 capacity: int = 8):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.encoder, self.derive, self.capacity = encoder, derive, capacity
        self._entries: OrderedDict[tuple, PromptEntry] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Forget every entry (those handed out stay valid: their holders keep them)."""
        with self._lock:
            self._entries.clear()

    def get(self, prompt: str, motion_score: int | None = None, use_chi: bool = True) -> PromptEntry:
        key = (prompt, motion_score, use_chi)
        with self._lock:
            if (entry := self._entries.get(key)) is not None:
                self._entries.move_to_end(key)
                return entry
        # Encode outside the lock, so that a miss in one thread does not stall other threads' hits.
        emb, mask = self.encoder.encode([prompt], motion_score, use_chi)
        with torch.no_grad():
            entry = PromptEntry(emb, mask, self.derive(emb, mask) if self.derive else None)
        with self._lock:
            entry = self._entries.setdefault(key, entry)  # a racing thread may have inserted it: one object per key
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return entry


# -- small local text encoders (tests, the demo model) --------------------------------------------------------------
SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>")  # ids 0..3, as in Gemma's tokenizer


def build_word_tokenizer(texts: Iterable[str], lowercase: bool = True):
    """A word-level fast tokenizer whose vocabulary is every word and punctuation run of `texts` (unknown words ->
    <unk>), adding BOS like Gemma's. Saved with `save_pretrained`, it loads back with AutoTokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    split = pre_tokenizers.Whitespace()  # runs of \w+ or of [^\w\s]+
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for text in texts:
        for word, _ in split.pre_tokenize_str(text.lower() if lowercase else text):
            vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = split
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>")


def build_gemma2(vocab_size: int, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 2, seed: int = 0):
    """A small random-weight Gemma2Model (the real one: hidden 2304, 26 layers, 8 heads x 256)."""
    from transformers import Gemma2Config, Gemma2Model

    head_dim = hidden_size // num_heads
    cfg = Gemma2Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                       num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=1,
                       head_dim=head_dim, query_pre_attn_scalar=head_dim, pad_token_id=0, eos_token_id=1,
                       bos_token_id=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Gemma2Model(cfg).eval()
