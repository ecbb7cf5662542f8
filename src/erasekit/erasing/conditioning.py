"""What the erase trains and what it conditions on: the text encoders' FFN tensors, prompts -> the UNet's
conditioning for SD1.x/SD2.x and SDXL, and the outputs of the text encoders that conditioning carries (what an
erase must hold, measure and store faithfully: every one the denoiser reads)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import ErasekitError
from ..format.names import module_name


def check_concepts(tokenizer: Any, concepts: Sequence[str]) -> None:
    for c in concepts:
        ids = tokenizer(c, add_special_tokens=False).input_ids
        if not c.strip() or not ids:
            raise ErasekitError(f"concept {c!r} tokenizes to nothing", "give the concept's name as a word or phrase")


def trainable(slot: str, text_encoder: Any, layers: list[int] | None) -> list[tuple[str, str, Any]]:
    """(module name, kind, parameter) of every FFN tensor to train, in a fixed order."""
    n = text_encoder.config.num_hidden_layers
    chosen = list(range(n)) if layers is None else layers
    bad = [i for i in chosen if not 0 <= i < n]
    if bad:
        raise ErasekitError(
            f"layer {bad[0]} is outside the text encoder's layers 0-{n - 1}", f"use layers 0-{n - 1}", option="layers"
        )
    out = []
    for i in sorted(set(chosen)):
        mlp = text_encoder.get_submodule(_layers_path(text_encoder) + f".{i}.mlp")
        for proj in ("fc1", "fc2"):
            lin = getattr(mlp, proj)
            out += [(module_name(slot, i, proj), "weight", lin.weight), (module_name(slot, i, proj), "bias", lin.bias)]
    return out


class Conditioner:
    """Prompts -> the UNet's conditioning, for SD1.x/SD2.x (one encoder, last hidden state) and SDXL (both
    encoders' penultimate hidden states concatenated, plus te2's pooled embedding and the size ids)."""

    def __init__(self, pipe: Any, resolution: int, encoders: Sequence[str] | None) -> None:
        te2 = getattr(pipe, "text_encoder_2", None)
        if te2 is None:
            self.arch = "sd2" if pipe.text_encoder.config.hidden_act == "gelu" else "sd1"
            available = {"te": (pipe.text_encoder, pipe.tokenizer)}
        else:
            self.arch = "sdxl"
            available = {"te1": (pipe.text_encoder, pipe.tokenizer), "te2": (te2, pipe.tokenizer_2)}
        self.all = available
        chosen = list(encoders) if encoders else list(available)
        unknown = [e for e in chosen if e not in available]
        if unknown:
            raise ErasekitError(
                f"{unknown[0]} is not an encoder of this {self.arch} model",
                f"choose from {', '.join(available)}",
                option="encoders",
            )
        self.trained = {s: available[s][0] for s in chosen}
        self.resolution = resolution
        self.tokens = min(tok.model_max_length for _, tok in available.values())  # tokens per prompt (77)
        self._ids: dict[tuple[int, str], Any] = {}  # (tokenizer, prompt) -> token ids: the loop repeats prompts

    def pooled_only(self, slot: str, layer: int) -> bool:
        """Whether the layer reaches the UNet only through the encoder's pooled embedding (SDXL's te2 last layer:
        the UNet reads te2's penultimate hidden states, and the pooled embedding from its last layer)."""
        return self.arch == "sdxl" and slot == "te2" and layer == self.all[slot][0].config.num_hidden_layers - 1

    def pooled_positions(self, slot: str, prompts: list[str]) -> list[int]:
        """For each prompt, the token position the encoder's pooled embedding is read from (the end of text), as
        transformers' CLIP text model finds it."""
        te, tok = self.all[slot]
        ids = self._token_ids(tok, prompts, "cpu")
        eos = te.config.eos_token_id
        return (ids.argmax(-1) if eos == 2 else (ids == eos).int().argmax(-1)).tolist()

    def useful_layers(self, slot: str) -> list[int]:
        """Layers whose change reaches the UNet: SDXL reads te1's penultimate hidden state, so te1's last
        layer cannot matter (te2's last layer still feeds its pooled embedding)."""
        n = self.all[slot][0].config.num_hidden_layers
        return list(range(n - 1)) if (self.arch == "sdxl" and slot == "te1") else list(range(n))

    def _token_ids(self, tok: Any, prompts: list[str], device: Any) -> Any:
        import torch

        new = [p for p in dict.fromkeys(prompts) if (id(tok), p) not in self._ids]
        if new:
            rows = tok(
                new, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
            ).input_ids
            self._ids.update({(id(tok), p): row for p, row in zip(new, rows)})
        return torch.stack([self._ids[(id(tok), p)] for p in prompts]).to(device)

    def __call__(self, prompts: list[str], device: Any) -> tuple[Any, dict[str, Any] | None]:
        import torch

        if self.arch != "sdxl":
            te, tok = self.all["te"]
            return te(self._token_ids(tok, prompts, device))[0], None
        (te1, tok1), (te2, tok2) = self.all["te1"], self.all["te2"]
        h1 = te1(self._token_ids(tok1, prompts, device), output_hidden_states=True).hidden_states[-2]
        out2 = te2(self._token_ids(tok2, prompts, device), output_hidden_states=True)
        r = self.resolution
        time_ids = torch.tensor([[r, r, 0, 0, r, r]], dtype=h1.dtype, device=device).repeat(len(prompts), 1)
        return torch.cat([h1, out2.hidden_states[-2]], dim=-1), {"text_embeds": out2.text_embeds, "time_ids": time_ids}


def encoder_outputs(conditioning: tuple[Any, dict[str, Any] | None]) -> dict[str, Any]:
    """The outputs of the text encoders that a conditioning carries to the UNet, by name, one row per prompt:
    ``hidden`` (the hidden states it cross-attends to) and, where the UNet reads one, ``pooled`` (SDXL's te2
    pooled embedding). What an erase holds and measures is each of these; SDXL's size ids come from no encoder."""
    cond, added = conditioning
    return {"hidden": cond} | ({"pooled": added["text_embeds"]} if added else {})


def output_drift(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """How far each output moved: ``|after - before| / |before|`` (Frobenius, over every prompt and token)."""
    return {
        name: float((after[name].double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))
        for name, b in before.items()
    }


def _layers_path(text_encoder: Any) -> str:
    names = dict(text_encoder.named_modules())
    return "text_model.encoder.layers" if "text_model.encoder.layers" in names else "encoder.layers"
