"""A patched model under DistributedDataParallel: two CPU processes (gloo), paper layout, so the
mini adapter is one tensor used by both towers of each rank."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from processes import spawn_on_free_port  # noqa: E402
from tiny_models import images, perturb_adapters, tiny_open_clip, tokens  # noqa: E402

import harma  # noqa: E402

BATCH = 4


def build_model() -> torch.nn.Module:
    model = harma.inject_harma_adapters(tiny_open_clip(), harma.HarmaConfig.paper())
    perturb_adapters(model)
    return model


def embedding_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    # A per-sample loss averaged over the local batch: DDP's gradient mean over two equal halves
    # then equals the gradient of the mean over the whole batch.
    return (image_embeds.square().sum(-1) + (image_embeds * text_embeds).sum(-1)).mean()


def worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = build_model()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        half = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
        optimizer = torch.optim.SGD(harma.adapter_parameters(model), lr=0.5)
        image_embeds, text_embeds, _ = ddp(images(BATCH)[half], tokens(BATCH)[half])
        embedding_loss(image_embeds, text_embeds).backward()
        optimizer.step()
        state = {name: p.detach().clone() for name, p in model.named_parameters() if ".harma_adapter." in name}
        torch.save(state, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_step_with_the_shared_mini_adapter_matches_one_process(tmp_path):
    spawn_on_free_port(worker, (str(tmp_path),), nprocs=2)
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")

    single = build_model()
    optimizer = torch.optim.SGD(harma.adapter_parameters(single), lr=0.5)
    image_embeds, text_embeds, _ = single(images(BATCH), tokens(BATCH))
    embedding_loss(image_embeds, text_embeds).backward()
    optimizer.step()

    expected = {name: p.detach() for name, p in single.named_parameters() if ".harma_adapter." in name}
    assert set(rank0) == set(expected)
    assert any(".mini_adapter." in name for name in expected)
    initial = dict(build_model().named_parameters())
    for name, value in expected.items():
        torch.testing.assert_close(rank0[name], rank1[name], rtol=0, atol=0)
        torch.testing.assert_close(rank0[name], value, rtol=1e-5, atol=1e-6)
        if name.endswith("up.weight"):
            assert not torch.equal(value, initial[name].detach()), f"{name} did not move"
