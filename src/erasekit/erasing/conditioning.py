"""What the erase trains and what it conditions on: the text encoders' FFN tensors, prompts -> the UNet's
conditioning (as the model's family says it reads its encoders: :class:`erasekit.families.base.Conditioning`), and
the outputs of the text encoders that conditioning carries (what an erase must hold, measure and store faithfully:
every one the denoiser reads)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import ErasekitError
from ..families import of_pipeline, with_article
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
    """Prompts -> the denoiser's conditioning, as the pipeline's family reads its encoders: SD1.x/SD2.x one
    encoder's last hidden state; SDXL both encoders' penultimate hidden states concatenated, plus te2's pooled
    embedding and the size ids; FLUX.1 T5's last hidden state and CLIP-L's pooled output; SD3.x its CLIPs'
    penultimate hidden states joined and padded to T5's width, then T5's, and both CLIPs' projected pooled
    embeddings. Each encoder's prompts are padded as the pipeline pads them (:attr:`lengths`)."""

    def __init__(self, pipe: Any, resolution: int, encoders: Sequence[str] | None) -> None:
        family = of_pipeline(pipe)
        if family is not None and family.pipeline is None:  # the SDXL refiner
            raise ErasekitError(
                f"erase cannot run {with_article(family.title)} pipeline ({type(pipe).__name__})", family.why_not_run
            )
        if family is None or family.conditioning is None:
            raise ErasekitError(
                f"erase cannot run this {type(pipe).__name__}",
                "load the model with erasekit.checkpoints.pipeline.load_pipeline",
            )
        self.arch, self.reads = family.name, family.conditioning
        available = {
            s.name: (getattr(pipe, s.component), getattr(pipe, s.tokenizer))
            for s in family.slots
            if getattr(pipe, s.component, None) is not None  # SD3.x without its T5
        }
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
        # slot -> tokens per prompt: its tokenizer's (CLIP's 77); for a T5 the pipeline's (FLUX.1 512, SD3.x 256)
        sequence = _max_sequence_length(pipe)
        self.lengths = {
            s: sequence if family.slot(s).encoder.kind.name == "t5" and sequence else int(tok.model_max_length)
            for s, (_, tok) in available.items()
        }
        # the token states in a missing encoder's place: zeros, as many as it would give (SD3.x without T5)
        self.missing = {
            s: (sequence or min(self.lengths.values()), _denoiser(pipe).config.joint_attention_dim)
            for s in self.reads.sequence_from
            if s not in available
        }
        self._ids: dict[tuple[int, int, str], Any] = {}  # (tokenizer, length, prompt) -> ids: the loop repeats them

    def pooled_only(self, slot: str, layer: int) -> bool:
        """Whether the layer reaches the UNet only through the encoder's pooled embedding (SDXL's te2 last layer:
        the UNet reads te2's penultimate hidden states, and the pooled embedding from its last layer)."""
        return self.reads.pooled_only(slot, layer, self.all[slot][0].config.num_hidden_layers)

    def pooled_positions(self, slot: str, prompts: list[str]) -> list[int]:
        """For each prompt, the token position the encoder's pooled embedding is read from (the end of text), as
        transformers' CLIP text model finds it."""
        te, _ = self.all[slot]
        ids = self._token_ids(slot, prompts, "cpu")
        eos = te.config.eos_token_id
        return (ids.argmax(-1) if eos == 2 else (ids == eos).int().argmax(-1)).tolist()

    def useful_layers(self, slot: str) -> list[int]:
        """Layers whose change reaches the UNet: SDXL reads te1's penultimate hidden state, so te1's last
        layer cannot matter (te2's last layer still feeds its pooled embedding)."""
        return self.reads.layers_read(slot, self.all[slot][0].config.num_hidden_layers)

    def _token_ids(self, slot: str, prompts: list[str], device: Any) -> Any:
        """Each prompt's token ids for ``slot``'s encoder, padded to its length (:attr:`lengths`)."""
        import torch

        tok, length = self.all[slot][1], self.lengths[slot]
        new = [p for p in dict.fromkeys(prompts) if (id(tok), length, p) not in self._ids]
        if new:
            rows = tok(new, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
            self._ids.update({(id(tok), length, p): row for p, row in zip(new, rows)})
        return torch.stack([self._ids[(id(tok), length, p)] for p in prompts]).to(device)

    def __call__(
        self, prompts: list[str], device: Any, frozen: dict[Any, Any] | None = None
    ) -> tuple[Any, dict[str, Any] | None]:
        """(the token states the denoiser attends to, its added conditioning: ``text_embeds``, the pooled
        embeddings, and SDXL's ``time_ids``; None where it reads neither). ``frozen``: where given, the outputs of
        the encoders the erase does not train are kept there by prompts and reused (they cannot change while it
        runs: for passes without gradients that repeat their prompts, e.g. a CLIP-only FLUX.1 erase's T5)."""
        import torch

        reads = self.reads
        penultimate = reads.hidden_layer == "penultimate"
        outs = {}
        for slot in reads.slots_read:
            if slot not in self.all:
                continue
            key = (slot, tuple(prompts), str(device))
            if frozen is not None and slot not in self.trained and key in frozen:
                outs[slot] = frozen[key]
                continue
            te = self.all[slot][0]
            outs[slot] = te(self._token_ids(slot, prompts, device), output_hidden_states=penultimate)
            if frozen is not None and slot not in self.trained:
                frozen[key] = outs[slot]
        hidden = [outs[s].hidden_states[-2] if penultimate else outs[s][0] for s in reads.hidden_from]
        cond = torch.cat(hidden, dim=-1) if len(hidden) > 1 else hidden[0]
        if reads.sequence_from:
            cond = self._followed(cond, [self._sequence(outs, s, len(prompts), device) for s in reads.sequence_from])
        if not reads.pooled_from:
            return cond, None
        pooled = [outs[s].text_embeds if reads.pooled_projected else outs[s].pooler_output for s in reads.pooled_from]
        added = {"text_embeds": torch.cat(pooled, dim=-1) if len(pooled) > 1 else pooled[0]}
        if reads.size_ids:
            r = self.resolution
            size = torch.tensor([[r, r, 0, 0, r, r]], dtype=hidden[0].dtype, device=device)
            added["time_ids"] = size.repeat(len(prompts), 1)
        return cond, added

    def _sequence(self, outs: dict[str, Any], slot: str, rows: int, device: Any) -> Any:
        """The last hidden states of ``slot``, which follow the others' tokens (zeros for a missing encoder)."""
        import torch

        if slot in outs:
            return outs[slot][0]
        tokens, width = self.missing[slot]
        return torch.zeros(rows, tokens, width, device=device)

    @staticmethod
    def _followed(cond: Any, sequence: list[Any]) -> Any:
        """``cond`` zero-padded along the features to the width of ``sequence``'s states, then followed by them
        along the tokens (SD3.x: its CLIPs' joined states, then T5's)."""
        import torch
        import torch.nn.functional as F

        width = sequence[0].shape[-1]
        return torch.cat([F.pad(cond, (0, width - cond.shape[-1])), *(s.to(cond.dtype) for s in sequence)], dim=-2)


def _denoiser(pipe: Any) -> Any:
    from ..checkpoints.pipeline import denoiser_of

    return denoiser_of(pipe)


def _max_sequence_length(pipe: Any) -> int | None:
    """How many tokens the pipeline pads a T5's prompts to when it is sampled (an erase conditions on what sampling
    will): the model's sampling defaults' (FLUX.1 schnell 256, the FLUX.1-family toy model 16), else its
    ``max_sequence_length`` default (FLUX.1 512, SD3.x 256); None for a pipeline without one."""
    import inspect

    from ..judging.sampling import sampling_of

    call = inspect.signature(type(pipe).__call__).parameters.get("max_sequence_length")
    if call is None:
        return None
    return sampling_of(pipe).max_sequence_length or int(call.default)


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
