"""``offload: blocks``: FLUX.1's and SD3.x's transformer blocks streamed from CPU memory during an erase (issue 21,
item 5). On the CPU the device is the CPU, but a use of a block still computes with a copy of it, and the backward
pass recomputes each block: what these tests watch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from erasekit.checkpoints.pipeline import load_pipeline
from erasekit.erasing.streaming import blocks_of, streamed
from erasekit.erasing.unlearn import erase
from erasekit.errors import ErasekitError
from erasekit.families import family
from erasekit.format.erase_config import EraseConfig
from erasekit.testing import make_tiny_pipeline

ARCHS = ("flux", "sd3")
SETTINGS = dict(steps=2, dtype="fp32", patch_dtype="F32", resolution=32, cache=False)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("offload")
    return {arch: make_tiny_pipeline(root / arch, arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def pipes(folders: dict[str, Path]) -> dict[str, Any]:
    return {arch: load_pipeline(folder)[0] for arch, folder in folders.items()}


@pytest.fixture(scope="module")
def images() -> list[Any]:
    from PIL import Image

    return [Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)) for i in range(2)]


def names(arch: str) -> tuple[str, ...]:
    return family(arch).streamed_blocks


def as_found(module: Any) -> dict[str, Any]:
    """What the erase must give back: each tensor's device, dtype, flag and values, each submodule's mode and own
    forward (a wrapper left behind would be one), the gradient checkpointing setting."""
    tensors = {n: t for n, t in [*module.named_parameters(), *module.named_buffers()]}
    return {
        "tensors": {n: (str(t.device), t.dtype, t.requires_grad, t.detach().clone()) for n, t in tensors.items()},
        "modes": {n: m.training for n, m in module.named_modules()},
        "own forwards": [n for n, m in module.named_modules() if "forward" in m.__dict__],
        "checkpointing": module.is_gradient_checkpointing,
    }


def assert_as_found(module: Any, found: dict[str, Any]) -> None:
    now = as_found(module)
    assert (now["modes"], now["own forwards"], now["checkpointing"]) == (
        found["modes"],
        found["own forwards"],
        found["checkpointing"],
    )
    assert now["tensors"].keys() == found["tensors"].keys()
    for name, (device, dtype, grad, values) in found["tensors"].items():
        d, t, g, v = now["tensors"][name]
        assert (d, t, g) == (device, dtype, grad), name
        assert torch.equal(v, values), name


class BlockWatch:
    """Where every block's weights are at each use of a block (its first submodule called: in its forward pass, and
    in the backward pass's recomputation; and differentiated, in the backward pass) and between uses (a block called
    by the transformer, before it moves in): at home, the storage each parameter was found in, or elsewhere (a copy,
    on the device)."""

    def __init__(self, transformer: Any, arch: str) -> None:
        self.blocks = blocks_of(transformer, names(arch))
        self.home = [self.storage(i) for i in range(len(self.blocks))]
        self.uses = [0] * len(self.blocks)
        self.backward_uses = [0] * len(self.blocks)
        self.wrong: list[str] = []
        self.hooks = [
            hook
            for i, block in enumerate(self.blocks)
            for hook in (
                next(block.children()).register_forward_pre_hook(lambda *_, i=i: self.inside(i)),
                next(block.children()).register_full_backward_hook(lambda *_, i=i: self.differentiated(i)),
                block.register_forward_pre_hook(lambda *_, i=i: self.between(i)),
            )
        ]

    def storage(self, i: int) -> list[int]:
        return [p.data_ptr() for p in self.blocks[i].parameters()]

    def at_home(self, i: int) -> bool:
        return self.storage(i) == self.home[i]

    def alone_away(self, i: int) -> bool:
        away = all(a != b for a, b in zip(self.storage(i), self.home[i]))
        return away and all(self.at_home(j) for j in range(len(self.blocks)) if j != i)

    def inside(self, i: int) -> None:
        self.uses[i] += 1
        if not self.alone_away(i):
            self.wrong.append(f"use of block {i}: not it alone on the device")

    def differentiated(self, i: int) -> None:
        """The backward pass through the recomputed block reads its weights (RMSNorm's saved ``self.weight``): they
        must still be on the device."""
        self.backward_uses[i] += 1
        if not self.alone_away(i):
            self.wrong.append(f"backward through block {i}: not it alone on the device")

    def between(self, i: int) -> None:
        if not all(self.at_home(j) for j in range(len(self.blocks))):
            self.wrong.append(f"before block {i}: a block left on the device")

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()


def block_bytes(transformer: Any, arch: str) -> int:
    return sum(p.numel() * p.element_size() for b in blocks_of(transformer, names(arch)) for p in b.parameters())


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # the watch's hook on a block taking kwargs
@pytest.mark.parametrize("arch", ARCHS)
def test_a_streamed_erase_gives_the_unstreamed_patch_moving_each_block_twice_a_step(
    pipes: dict[str, Any], images: list[Any], arch: str
) -> None:
    """Each block comes to the device for its forward pass and again for the backward pass's recomputation, alone,
    and is back home between uses; the patch is the unstreamed erase's to float32 rounding (a relative 1e-4 of the
    largest value of each delta; measured: 1e-5), and the pipeline comes back as found."""
    pipe = pipes[arch]
    found = as_found(pipe.transformer)
    plain = erase(pipe, ["cat"], [images], EraseConfig(**SETTINGS))
    watch = BlockWatch(pipe.transformer, arch)
    try:
        streamed_erase = erase(pipe, ["cat"], [images], EraseConfig(**SETTINGS, offload="blocks"))
    finally:
        watch.close()
    assert watch.wrong == [] and watch.uses == [2 * SETTINGS["steps"]] * len(watch.blocks)
    assert watch.backward_uses == [SETTINGS["steps"]] * len(watch.blocks)
    assert plain.streamed_bytes == 0
    assert streamed_erase.streamed_bytes == 2 * SETTINGS["steps"] * block_bytes(pipe.transformer, arch)
    assert streamed_erase.losses == pytest.approx(plain.losses, rel=1e-6)
    deltas = plain.patch.manifest.deltas
    assert deltas.keys() == streamed_erase.patch.manifest.deltas.keys()
    for module in deltas:
        want = plain.patch.weight_delta(module)
        assert np.abs(want).max() > 0
        np.testing.assert_allclose(
            streamed_erase.patch.weight_delta(module), want, rtol=0, atol=1e-4 * np.abs(want).max()
        )
    assert "offload" not in streamed_erase.patch.manifest.method.hyperparameters  # how it ran, not what it computed
    assert_as_found(pipe.transformer, found)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_gradient_reaching_the_conditioning_is_the_same(pipes: dict[str, Any], arch: str) -> None:
    """Through every block, recomputed one at a time: the gradients of the token states and of the pooled embedding
    are the unstreamed ones to float32 rounding (rtol 1e-5); a pass without gradients moves each block in once and
    gives the unstreamed output exactly."""
    from erasekit.erasing.conditioning import Conditioner
    from erasekit.erasing.denoising import make_denoiser

    pipe = pipes[arch]
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    denoiser = make_denoiser(pipe, x0, None)
    with torch.no_grad():
        hidden, added = Conditioner(pipe, 32, None)(["a cat", "a dog"], "cpu")

    def gradients(blocks: tuple[str, ...]) -> list[Any]:
        inputs = [hidden.clone().requires_grad_(True), added["text_embeds"].clone().requires_grad_(True)]
        with streamed(pipe.transformer, blocks, "cpu"):
            loss = denoiser.predict([0, 1], torch.tensor([100, 700]), noise, (inputs[0], {"text_embeds": inputs[1]}))
            loss.loss.backward()
        return [x.grad for x in inputs]

    plain, streamed_grads = gradients(()), gradients(names(arch))
    for want, got in zip(plain, streamed_grads):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    with torch.no_grad():  # without gradients (a frozen prediction, an image rendered): the same computation
        want = denoiser.run(x0, torch.tensor([100, 700]), (hidden, added))
        with streamed(pipe.transformer, names(arch), "cpu") as stream:
            got = denoiser.run(x0, torch.tensor([100, 700]), (hidden, added))
    assert (
        torch.equal(got, want) and stream is not None and stream.moves == len(blocks_of(pipe.transformer, names(arch)))
    )


@pytest.mark.parametrize("use", [1, 2], ids=["in-a-forward-pass", "in-a-backward-pass"])
def test_an_error_mid_loop_gives_the_pipeline_back_as_found(pipes: dict[str, Any], images: list[Any], use: int) -> None:
    """A fault while the first block is on the device (its first use: the forward pass of step 1; its second: the
    backward pass's recomputation): the error comes through and every block is back, with its own forward."""
    pipe = pipes["flux"]
    found = as_found(pipe.transformer)
    first = blocks_of(pipe.transformer, names("flux"))[0]
    calls: list[int] = []

    def fault(*_: Any) -> None:
        calls.append(1)
        if len(calls) == use:
            raise RuntimeError("a fault in the block")

    hook = next(first.children()).register_forward_pre_hook(fault)
    try:
        with pytest.raises(RuntimeError, match="a fault in the block"):
            erase(pipe, ["cat"], [images], EraseConfig(**SETTINGS, offload="blocks", checkpointing=True))
    finally:
        hook.remove()
    assert len(calls) == use
    assert_as_found(pipe.transformer, found)


def test_the_erase_loads_the_blocks_into_cpu_memory_and_the_rest_onto_the_device(
    tmp_path: Path, folders: dict[str, Path], images: list[Any]
) -> None:
    """The pipeline an erase loads (``device: meta`` here, where a tensor that moved is seen to move): with ``offload
    blocks``, every tensor but the transformer's blocks' is on the device; without, every one."""
    from erasekit.erasing.erase_job import load_for, prepare_erase
    from erasekit.erasing.unlearn import Clock

    folder = tmp_path / "cats"
    folder.mkdir()
    for i, im in enumerate(images):
        im.save(folder / f"cat{i}.png")

    def devices(offload: str) -> dict[str, set[str]]:
        job = prepare_erase(folders["flux"], ["cat"], [folder], tmp_path / "p.erasepatch", {"offload": offload})
        job.config = job.config.model_copy(update={"device": "meta"})
        pipe, _ = load_for(job, Clock())
        blocks = {id(t) for b in blocks_of(pipe.transformer, names("flux")) for t in b.parameters()}
        tensors = [t for m in pipe.components.values() if isinstance(m, torch.nn.Module) for t in m.parameters()]
        return {
            "blocks": {t.device.type for t in tensors if id(t) in blocks},
            "rest": {t.device.type for t in tensors if id(t) not in blocks},
        }

    assert devices("blocks") == {"blocks": {"cpu"}, "rest": {"meta"}}
    assert devices("none") == {"blocks": {"meta"}, "rest": {"meta"}}


def run(*args: object) -> Any:
    from typer.testing import CliRunner

    from erasekit.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_erase_streams_through_the_cli_and_refuses_a_unet(tmp_path: Path, folders: dict[str, Path]) -> None:
    from erasekit.format.patchfile import load_patch

    out = tmp_path / "flux.erasepatch"
    images = tmp_path / "cats"
    images.mkdir()
    from PIL import Image

    for i in range(2):
        pixels = np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"cat{i}.png")
    r = run(
        "erase",
        "--model",
        folders["flux"],
        "-c",
        "cat",
        "--images",
        images,
        "--steps",
        "2",
        "-o",
        out,
        "--offload",
        "blocks",
    )
    assert r.exit_code == 0, r.output
    assert "the transformer's blocks streamed from CPU memory" in r.output
    assert "offload" not in load_patch(out).manifest.method.hyperparameters

    refused = tmp_path / "sd1.erasepatch"
    r = run("erase", "-c", "circle", "-o", refused, "--offload", "blocks")  # the built-in model: SD1.x's UNet
    assert r.exit_code == 1 and not refused.exists()
    assert r.output.count("\n") == 1 and "offload blocks streams the blocks of FLUX.1's and SD3.x's" in r.output
    r = run("erase", "-c", "circle", "-o", refused, "--offload", "layers")
    assert r.exit_code == 1 and "invalid offload" in r.output and not refused.exists()


def test_a_unet_pipeline_is_refused_by_the_library(tmp_path: Path) -> None:
    pipe = load_pipeline(make_tiny_pipeline(tmp_path / "sd1", "sd1"))[0]
    with pytest.raises(ErasekitError, match="UNet fits a GPU whole") as e:
        erase(pipe, ["cat"], [[]], EraseConfig(**SETTINGS, offload="blocks"))
    assert e.value.option == "offload"
