"""The patch an erase writes: its trained deltas (low-rank where compressed), the base tensors' fingerprints,
and a manifest with every setting needed to make it again."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..format.erase_config import EraseConfig


@dataclass
class Trained:
    """What the loop trained: (module, kind, parameter) triples, the original values of those it writes (on the
    CPU: on a GPU the memory is the optimizer's) and, where no files give the base, the fingerprints of the
    parameters as the erase found them (:func:`memory_fingerprints`); after it, the dense deltas (numpy) of the
    tensors it trained and, when stored low-rank, each weight's factors. With ``trained_factors`` (``train:
    factors``) the model is never written: factors and bias deltas train in place of its weights and biases."""

    params: list[tuple[str, str, Any]]
    originals: dict[tuple[str, str], Any]
    fingerprints: dict[str, Any]
    dense: dict[tuple[str, str], Any] = field(default_factory=dict)
    factors: dict[str, Any] = field(default_factory=dict)
    trained_factors: Any = None  # with train: factors, their erasing.factors.Factors

    def written(self) -> list[tuple[str, str, Any]]:
        """The triples whose parameters the loop writes: all of them, or with trained factors none."""
        return self.params if self.trained_factors is None else []

    def optimized(self) -> list[Any]:
        """The tensors Adam trains: the written parameters, or the factors and bias deltas where they train."""
        factors = self.trained_factors.tensors() if self.trained_factors is not None else []
        return [p for _, _, p in self.written()] + factors

    def keep_originals(self) -> None:
        self.originals = {(m, kind): p.detach().to("cpu", copy=True) for m, kind, p in self.written()}

    def take_deltas(self) -> None:
        self.dense = {
            (m, kind): (p.detach().cpu() - self.originals[(m, kind)]).numpy() for m, kind, p in self.written()
        }
        if self.trained_factors is not None:
            self.factors = self.trained_factors.stored()
            self.dense |= {(m, "bias"): db for m, db in self.trained_factors.stored_biases().items()}

    def weight_norms(self, modules: Any) -> dict[str, float]:
        """``|delta W|`` (Frobenius) of each module's weight."""
        if self.trained_factors is not None:
            norms = self.trained_factors.norms()
            return {m: norms[m] for m in modules}
        return {m: float(np.linalg.norm(self.dense[(m, "weight")])) for m in modules}

    def restore(self) -> None:
        import torch

        with torch.no_grad():
            for m, kind, p in self.written():
                p.copy_(self.originals[(m, kind)])


def memory_fingerprints(params: list[tuple[str, str, Any]]) -> dict[str, Any]:
    """The fingerprints of the trained tensors as they are in memory, each in its own dtype (T5's ``wo`` may be
    float32 in an fp16 encoder): the base a patch records where no files give it. Taken before the erase converts or
    patches anything."""
    from .._torch import dtype_code, tensor_bytes
    from ..format.patchfile import fingerprint

    return {f"{m}.{kind}": fingerprint(tensor_bytes(p), dtype_code(p.dtype), tuple(p.shape)) for m, kind, p in params}


METHOD_NAMES = {"doco": "wu-2024-doco"}  # the other recipes are variants of Fuchi & Takagi's


def build_patch(
    config: EraseConfig,
    concepts: Sequence[str],
    cond_of: Any,
    trained: Trained,
    base_files: Any,
    ran: dict[str, Any],
    provenance: dict[str, Any],
) -> Any:
    """The patch: the trained deltas (low-rank where ``trained.factors`` has them) and the base tensors'
    fingerprints (of the files on disk when ``base_files`` is given, so it applies "exact" to them). ``ran``:
    what the run measured, recorded with the hyperparameters; ``provenance``: the manifest's ``Method`` fields
    (images_sha256, num_images, duration_s)."""
    from ..format.names import parse_module_name
    from ..format.patchfile import (
        Concept,
        EncoderInfo,
        Method,
        Patch,
        delta_tensors,
        fingerprint,
        new_manifest,
        storage_dtypes,
    )

    tensors: dict[str, Any] = {}
    deltas = {}
    fps = {}
    if base_files is not None:  # a checkpoint with patches applied in place: the base is the one below them
        from ..checkpoints.in_place import pristine_reader

        read = pristine_reader(base_files)
    for m, kind, _ in trained.params:
        slot, layer, proj = parse_module_name(m)  # type: ignore[misc]
        if kind == "weight":
            stored, deltas[m] = delta_tensors(  # no bias delta where the projection has no bias (T5)
                m, trained.dense.get((m, "weight")), trained.dense.get((m, "bias")), trained.factors.get(m)
            )
            tensors.update(stored)
        if base_files is not None:
            wf = next(f for f in base_files.files if slot in f.encoders)
            key = wf.encoders[slot].key(layer, proj, kind)
            dtype, shape = wf.tensor_info()[key]
            fps[f"{m}.{kind}"] = fingerprint(read(wf, key), dtype, shape)
        else:  # of the weights as they were in memory
            fps[f"{m}.{kind}"] = trained.fingerprints[f"{m}.{kind}"]
    hp = config.hyperparameters() | ran
    manifest = new_manifest(
        title=" + ".join(concepts) + " erased",
        architecture=cond_of.arch,
        encoders={
            slot: EncoderInfo(
                hidden=te.config.hidden_size,
                intermediate=getattr(te.config, "intermediate_size", None) or te.config.d_ff,  # T5's is d_ff
                layers=te.config.num_hidden_layers,
            )
            for slot, te in cond_of.trained.items()
        },
        fingerprints=fps,
        deltas=deltas,
        concepts=[Concept(name=c, kind=config.kind) for c in concepts],
        method=Method(
            name=METHOD_NAMES.get(config.recipe, "fuchi-takagi-2024"),
            hyperparameters=hp,
            seed=config.seed,
            **provenance,
        ),
        source=str(base_files.path.name) if base_files is not None else None,
        config=base_files.config if base_files is not None else None,
    )
    return Patch(manifest, tensors, storage_dtypes(tensors, config.patch_dtype))
