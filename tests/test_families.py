"""The families' data hangs together (docs/architecture.md, "Architectures as data"): what one family module or
encoder-kind module declares names only slots, namings, components and configs that exist, so that a new family is
one new file and a mistake in it fails here rather than in a user's detect or export."""

from __future__ import annotations

from erasekit.checkpoints.model_configs import CONFIGS_DIR
from erasekit.families import FAMILIES
from erasekit.families.encoders import ENCODER_KINDS, NAMINGS
from erasekit.format.names import module_name, parse_module_name


def test_names_are_unique_over_every_encoder_kind() -> None:
    projections = [p for k in ENCODER_KINDS.values() for p in k.projections]
    namings = [n.name for k in ENCODER_KINDS.values() for n in k.namings]
    assert len(projections) == len(set(projections)) and len(namings) == len(set(namings))
    for kind in ENCODER_KINDS.values():
        assert kind.widening and set(kind.widening) < set(kind.projections), kind.name


def test_every_family_names_what_exists() -> None:
    for f in FAMILIES.values():
        slots = [s.name for s in f.slots]
        assert len(slots) == len(set(slots)), f.name
        required = {s.name for s in f.slots if not s.optional}
        for sf in f.single_files:
            assert required <= set(sf.encoders) <= set(slots), (f.name, sf.layout)
            assert all(naming in NAMINGS for naming, _ in sf.encoders.values()), (f.name, sf.layout)
        for ui, (_, naming) in f.ui_modules.items():
            assert naming in NAMINGS, (f.name, ui)
        assert all(k in FAMILIES for k in f.kin), f.name
        assert all((CONFIGS_DIR / name / "model_index.json").is_file() for name in f.bundled), f.name
        if f.told_apart:
            assert f.told_apart[0] in f.components, f.name
        if f.conditioning:
            assert set(f.conditioning.slots_read) <= set(slots), f.name
        if f.pipeline:
            assert f.conditioning and not f.bare, f.name
            assert f.bundled, f.name  # its single files run with nothing beside them
        if len(f.bundled) > 1 and f.flow_matching:  # told apart by a key of the denoiser, the last one for the rest
            assert [v[0] for v in f.variants] and set(v[0] for v in f.variants) == set(f.bundled), f.name
            assert all(v[1] for v in f.variants[:-1]) and f.variants[-1][1] == "", f.name
        assert set(f.uis) <= {"comfyui", "a1111", "diffusers"}, f.name
        assert all(s.encoder.file for s in f.slots) if f.denoiser_alone else True, f.name  # named when refused


def test_module_names_of_every_slot_read_back() -> None:
    for f in FAMILIES.values():
        for s in f.slots:
            for proj in s.encoder.kind.projections:
                assert parse_module_name(module_name(s.name, 11, proj)) == (s.name, 11, proj)
    assert parse_module_name("lora_te1_text_model_encoder_layers_03_mlp_fc1") is None  # no leading zeros


def test_messages_name_a_family_with_the_article_it_is_read_with() -> None:
    """ "an SD3.x pipeline", "an sdxl model", "a FLUX.1 transformer", "an AuraFlow transformer": family titles,
    architecture ids and the other words messages put an article before."""
    from erasekit.families import with_article

    titles = {f.title for f in FAMILIES.values()}
    assert {"SD1.x", "SDXL base", "FLUX.1", "SD3.x"} <= titles
    words = [
        "SD1.x",
        "SDXL base",
        "sd3",
        "FLUX.1",
        "flux",
        "clip-text",
        "T5",
        "UMT5",
        "AuraFlow",
        "epsilon",
        "v_prediction",
    ]
    assert [with_article(w) for w in words] == [
        "an SD1.x",
        "an SDXL base",
        "an sd3",
        "a FLUX.1",
        "a flux",
        "a clip-text",
        "a T5",
        "a UMT5",
        "an AuraFlow",
        "an epsilon",
        "a v_prediction",
    ]
