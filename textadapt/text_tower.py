"""Length-aware text encoding: run open_clip's causal text towers only over the tokens that exist.

open_clip tokenises every text to the full context (77 tokens for CLIP) and runs the text transformer
over all of it; a typical description is about 22 tokens, the rest is padding. In a *causal* tower a
position attends only to itself and the positions before it, so the pooled position (the end-of-text
token) cannot see the padding after it. Here the texts are tokenised, sorted by how many leading
positions their embedding depends on, batched, and each batch is cut to its longest: the same
embeddings as open_clip's ``encode_text`` (to float rounding), about 3 to 4 times faster on typical
descriptions (``benchmarks/encoders.py``).

Which towers take this path is read off the model, never its name (``causal_tower``):

- open_clip's own text transformer, inline in ``open_clip.CLIP`` (ViT-B-32, RN50, ... and the
  worldwide models with ``eos`` pooling) or a plain ``open_clip.transformer.TextTransformer`` as
  ``model.text`` (EVA, MobileCLIP-B, PE-Core, CoCa);
- with a causal attention mask (checked on the mask tensor itself);
- pooled at argmax (CLIP's end-of-text), eos or first; or CoCa's appended class token, which is
  pooled last but attends only the tokens its padding mask leaves (positions up to the last
  non-padding token; open_clip 3.3's CoCa mask is shifted by one and also lets it see the first
  padding token, which is kept).

Everything else runs open_clip's own ``model.encode_text`` at full length: bidirectional towers
(SigLIP, CLIPA, MobileCLIP-S*, pooled at the last position or over every token), Hugging Face text
towers (``hf-hub:``, ``HFTextEncoder``), subclasses of open_clip's classes, and models whose
``encode_text`` is not open_clip's.

Other encoders of text in textadapt, and how they take the same path:

- the prompt learner (``prompt_learning.PromptedClasses``) builds its own token embeddings
  (start-of-text, context vectors, class name, end-of-text) and already cuts the padding once for
  all classes. ``CausalTower.encode(ids, token_embeds=x)`` runs such embeddings through the same
  length-aware tower: ``ids`` must hold a placeholder token at each context position (so the
  end-of-text position, which moves right by the number of context tokens, is read from ``ids``);
  sorting the classes by ``tower.lengths(ids)`` before chunking cuts each chunk to its own longest.
- the CoCa captioner (``captioner._tokenize``) needs the token states of the unimodal tower, not
  the pooled embedding; it cuts the tokens to the longest caption (end-of-text included) itself,
  which is exact for the token states for the same reason (each token attends only to tokens
  before it); it needs nothing from here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# Texts tokenised and sorted together: batches are cut to lengths sorted over this many texts at a time,
# so memory for the tokens stays bounded (77 int64 per text) however many texts there are.
SORT_WINDOW = 16384
POOLS = ("argmax", "eos", "first")  # pooled positions that only see the tokens up to them


def is_causal_mask(mask: torch.Tensor | None) -> bool:
    """True for an additive (P, P) mask that is -inf exactly above the diagonal and 0 elsewhere."""
    if mask is None or mask.dim() != 2 or mask.shape[0] != mask.shape[1]:
        return False
    upper = torch.ones(mask.shape, dtype=torch.bool, device=mask.device).triu(1)
    return bool(torch.equal(torch.isneginf(mask), upper) and torch.all(mask[~upper] == 0))


@dataclass(frozen=True)
class CausalTower:
    """The parts of a causal open_clip text tower that ``encode_text`` runs, in its order."""

    token_embedding: torch.nn.Embedding
    positional_embedding: torch.Tensor
    transformer: torch.nn.Module
    ln_final: torch.nn.Module
    text_projection: torch.nn.Module | torch.Tensor | None
    attn_mask: torch.Tensor  # causal, (P, P)
    pool_type: str  # argmax, eos or first; ignored with a class token
    eos_id: int | None
    cls_emb: torch.Tensor | None = None  # CoCa: a class token appended after the context, pooled
    pad_id: int = 0  # with a class token: keys equal to pad_id are masked
    heads: int = 1
    correct_cls_mask: bool = False

    def _cls_keys(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L + 1) bool: the keys (tokens, then the class token) that are not masked, as open_clip's
        ``TextTransformer._build_additive_mask`` computes them (shifted by one unless correct_cls_mask)."""
        valid = tokens != self.pad_id
        cls = valid.new_ones(len(tokens), 1)
        return torch.cat([valid, cls] if self.correct_cls_mask else [cls, valid], 1)

    def lengths(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B,) how many leading token positions each row's embedding depends on."""
        if self.cls_emb is not None:  # the last key among the tokens that the class token attends
            positions = torch.arange(tokens.shape[1], device=tokens.device)
            keys = self._cls_keys(tokens)[:, : tokens.shape[1]]
            return torch.where(keys, positions, -1).amax(1).clamp(min=0) + 1
        if self.pool_type == "argmax":
            pooled_at = tokens.argmax(dim=-1)
        elif self.pool_type == "eos":
            pooled_at = (tokens == self.eos_id).int().argmax(dim=-1)
        else:
            pooled_at = torch.zeros_like(tokens[:, 0])
        return pooled_at + 1

    def encode(self, tokens: torch.Tensor, token_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """(B, D) unnormalised text features of ``tokens`` (B, L), equal to the model's ``encode_text``,
        computed over the first ``lengths(tokens).max()`` positions only.

        ``token_embeds`` (B, >= that many, width): the token embeddings to run instead of looking up
        ``tokens`` (prompt learning); ``tokens`` still says where the pooled token is and what is padding.
        """
        from open_clip.transformer import text_global_pool

        B, L = tokens.shape
        n = int(self.lengths(tokens).max()) if B else 1
        cast = self.transformer.get_cast_dtype()
        x = (self.token_embedding(tokens[:, :n]) if token_embeds is None else token_embeds[:, :n]).to(cast)
        if self.cls_emb is None:
            x = x + self.positional_embedding[:n].to(cast)
            x = self.transformer(x, attn_mask=self.attn_mask[:n, :n])
            x = self.ln_final(x)
            pooled = text_global_pool(x, tokens[:, :n], self.pool_type, eos_token_id=self.eos_id)
        else:
            # The class token keeps its place after all L tokens: its positional embedding and the keys
            # it may attend are those of the full sequence, restricted to the first n tokens and itself.
            kept = torch.cat([torch.arange(n, device=tokens.device), torch.tensor([L], device=tokens.device)])
            x = torch.cat([x, self.cls_emb.view(1, 1, -1).expand(B, -1, -1)], 1)
            keys = self._cls_keys(tokens)[:, kept]
            padding = torch.zeros(B, n + 1, n + 1, dtype=x.dtype, device=x.device)
            padding.masked_fill_(~keys.unsqueeze(1).expand(-1, n + 1, -1), float("-inf"))
            mask = self.attn_mask[: n + 1, : n + 1].unsqueeze(0) + padding.repeat_interleave(self.heads, 0)
            x = x + self.positional_embedding[kept].to(cast)
            x = self.transformer(x, attn_mask=mask)
            pooled = self.ln_final(x[:, -1])
        if isinstance(self.text_projection, torch.nn.Linear):
            pooled = self.text_projection(pooled)
        elif self.text_projection is not None:
            pooled = pooled @ self.text_projection
        return pooled


def _refusal(model: torch.nn.Module) -> tuple[CausalTower | None, str]:
    from open_clip.coca_model import CoCa
    from open_clip.model import CLIP, CustomTextCLIP
    from open_clip.transformer import TextTransformer

    kind = type(model)
    if kind.encode_text is CLIP.encode_text:  # the tower inline in the model (OpenAI CLIP's layout)
        if not is_causal_mask(getattr(model, "attn_mask", None)):
            return None, "its text attention mask is not causal"
        if model.text_pool_type not in POOLS:
            return None, f"it pools text at {model.text_pool_type!r}"
        return CausalTower(
            model.token_embedding,
            model.positional_embedding,
            model.transformer,
            model.ln_final,
            model.text_projection,
            model.attn_mask,
            model.text_pool_type,
            getattr(model, "text_eos_id", None),
        ), ""
    if kind.encode_text not in (CustomTextCLIP.encode_text, CoCa.encode_text):
        return None, f"{kind.__name__}.encode_text is not open_clip's"
    text = getattr(model, "text", None)
    if type(text) is not TextTransformer:  # noqa: E721 (a subclass may compute something else)
        return None, f"its text tower is a {type(text).__name__}, not open_clip's TextTransformer"
    if not is_causal_mask(text.attn_mask) or text.use_pad_mask:
        return None, "its text attention mask is not causal"
    if text.cls_emb is None and text.pool_type not in POOLS:
        return None, f"it pools text at {text.pool_type!r}"
    return CausalTower(
        text.token_embedding,
        text.positional_embedding,
        text.transformer,
        text.ln_final,
        text.text_projection,
        text.attn_mask,
        text.pool_type,
        getattr(text, "eos_id", None),
        text.cls_emb,
        text.pad_id,
        text.heads,
        text.correct_cls_mask,
    ), ""


def causal_tower(model: torch.nn.Module) -> CausalTower | None:
    """The model's text tower if length-aware encoding is exact for it, else None (see the module docstring)."""
    tower, why = _refusal(model)
    if tower is None:
        log.debug("%s: text encoded at full length: %s", type(model).__name__, why)
    return tower


def iter_text_features(
    model: torch.nn.Module, tokenizer, texts: Sequence[str], batch_size: int, device: torch.device | str = "cpu"
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """L2-normalised text embeddings, one batch at a time: (indices into ``texts``, (len(indices), D)).

    With a causal tower the batches come longest first (sorted within windows of ``SORT_WINDOW``
    texts), each cut to its longest; otherwise in order, through ``model.encode_text`` at full length.
    Run under ``torch.inference_mode()`` (or with gradients, if wanted): nothing here chooses.
    """
    tower = causal_tower(model)
    window = batch_size * max(1, SORT_WINDOW // batch_size)
    for w0 in range(0, len(texts), window):
        tokens = tokenizer(list(texts[w0 : w0 + window]))
        order = torch.arange(len(tokens))
        if tower is not None:
            order = torch.sort(tower.lengths(tokens), descending=True, stable=True).indices
        for b0 in range(0, len(order), batch_size):
            idx = order[b0 : b0 + batch_size]
            batch = tokens[idx].to(device)
            if tower is None:
                features = model.encode_text(batch, normalize=True)
            else:
                features = F.normalize(tower.encode(batch), dim=-1)
            yield (idx + w0).numpy(), features
