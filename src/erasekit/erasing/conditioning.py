"""What the erase trains and what it conditions on: the text encoders' FFN tensors, prompts -> the UNet's
conditioning (as the model's family says it reads its encoders: :class:`erasekit.families.base.Conditioning`), and
the outputs of the text encoders that conditioning carries (what an erase must hold, measure and store faithfully:
every one the denoiser reads)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import ErasekitError
from ..families import of_pipeline
from ..families.base import EncoderKind
from ..families.encoders import ENCODER_KINDS
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
    kind, root = _ffn_naming(text_encoder)
    out = []
    for i in sorted(set(chosen)):
        for proj in kind.projections:
            lin = text_encoder.get_submodule(root + kind.namings[0].path(i, proj))
            out += [(module_name(slot, i, proj), t, getattr(lin, t)) for t in kind.tensor_kinds]
    return out


class Conditioner:
    """Prompts -> the UNet's conditioning, as the pipeline's family reads its encoders: SD1.x/SD2.x one encoder's
    last hidden state; SDXL both encoders' penultimate hidden states concatenated, plus te2's pooled embedding and
    the size ids."""

    def __init__(self, pipe: Any, resolution: int, encoders: Sequence[str] | None) -> None:
        family = of_pipeline(pipe)
        if family is not None and family.pipeline is None:  # FLUX.1, SD3.x: their conditioning is data, not run yet
            raise ErasekitError(
                f"erase cannot run a {family.title} pipeline ({type(pipe).__name__})", family.why_not_run
            )
        if family is None or family.conditioning is None:
            raise ErasekitError(
                f"erase cannot run this {type(pipe).__name__}",
                "load the model with erasekit.checkpoints.pipeline.load_pipeline",
            )
        self.arch, self.reads = family.name, family.conditioning
        available = {s.name: (getattr(pipe, s.component), getattr(pipe, s.tokenizer)) for s in family.slots}
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
        return self.reads.pooled_only(slot, layer, self.all[slot][0].config.num_hidden_layers)

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
        return self.reads.layers_read(slot, self.all[slot][0].config.num_hidden_layers)

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

        reads = self.reads
        penultimate = reads.hidden_layer == "penultimate"
        outs = {}
        for slot in reads.slots_read:
            te, tok = self.all[slot]
            outs[slot] = te(self._token_ids(tok, prompts, device), output_hidden_states=penultimate)
        hidden = [outs[s].hidden_states[-2] if penultimate else outs[s][0] for s in reads.hidden_from]
        cond = torch.cat(hidden, dim=-1) if len(hidden) > 1 else hidden[0]
        if not reads.pooled_from:
            return cond, None
        pooled = [outs[s].text_embeds if reads.pooled_projected else outs[s].pooler_output for s in reads.pooled_from]
        added = {"text_embeds": torch.cat(pooled, dim=-1) if len(pooled) > 1 else pooled[0]}
        if reads.size_ids:
            r = self.resolution
            size = torch.tensor([[r, r, 0, 0, r, r]], dtype=hidden[0].dtype, device=device)
            added["time_ids"] = size.repeat(len(prompts), 1)
        return cond, added


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


def _ffn_naming(text_encoder: Any) -> tuple[EncoderKind, str]:
    """The kind of a transformers text encoder and the path above its layers (``text_model.`` in a CLIPTextModel,
    none in a bare encoder stack), found by where its first FFN projection is."""
    names = dict(text_encoder.named_modules())
    for kind in ENCODER_KINDS.values():
        for root in kind.folder_prefixes:
            if root + kind.namings[0].path(0, kind.projections[0]) in names:
                return kind, root
    raise ErasekitError(f"{type(text_encoder).__name__} has no FFN erasekit knows", "pass a CLIP text encoder")
