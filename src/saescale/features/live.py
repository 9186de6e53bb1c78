"""Live inspection: text in, the latents that fire on each token out. Nothing is written.

The text is tokenised as the cache's windows were (a BOS token first when the tokenizer has one,
no other special tokens) and run to the SAE's hook site; special tokens get no latents (the cache
dropped them, so the SAE never saw them).
"""

from __future__ import annotations

import threading

import torch

from saescale.core.model import TopKSAE
from saescale.lm.hooks import run_to_hook

MAX_TOKENS = 256  # the longest text accepted: the forward runs on the request's thread


class LiveInputError(ValueError):
    """Text the service cannot take (empty, too long, or not tokenisable); the message says which."""


class LiveEncoder:
    def __init__(
        self, model, tokenizer, sae: TopKSAE, site: str, layer: int, max_tokens: int = MAX_TOKENS, top: int = 8
    ):
        self.model, self.tokenizer, self.sae = model, tokenizer, sae
        self.site, self.layer, self.max_tokens, self.top = site, layer, max_tokens, top
        self.special = set(getattr(tokenizer, "all_special_ids", []) or [])
        self.lock = threading.Lock()  # one forward at a time

    def tokenize(self, text: str) -> list[int]:
        if not isinstance(text, str) or not text.strip():
            raise LiveInputError("type some text first")
        try:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        except Exception as exc:  # noqa: BLE001 - tokenizers raise their own types
            raise LiveInputError(f"the tokenizer cannot take this text: {exc}") from None
        bos = getattr(self.tokenizer, "bos_token_id", None)
        ids = ([bos] if bos is not None else []) + list(ids)
        if len(ids) > self.max_tokens:
            raise LiveInputError(f"the text has {len(ids)} tokens; the limit is {self.max_tokens}")
        return ids

    @torch.no_grad()
    def run(self, text: str) -> dict:
        """{"tokens": [str], "latents": per token [[latent, activation], ...] largest first}."""
        ids = self.tokenize(text)
        with self.lock:
            acts = run_to_hook(self.model, torch.tensor([ids]), self.site, self.layer)[0].float()
            code = self.sae.encode(acts)
        latents = []
        for t, values, indices in zip(ids, code.values.tolist(), code.indices.tolist()):
            fired = sorted(((i, v) for i, v in zip(indices, values) if v > 0), key=lambda p: -p[1])
            latents.append([] if t in self.special else [[i, round(v, 4)] for i, v in fired[: self.top]])
        return {"tokens": self.tokenizer.batch_decode([[t] for t in ids]), "latents": latents}
