"""Two CPU processes (gloo) against one process on the concatenated batch."""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from harma.classification import ZeroShotEvaluator
from harma.distributed import (
    all_gather_no_grad,
    all_gather_with_grad,
    cleanup_distributed,
    get_rank,
    get_world_size,
    init_distributed_from_env,
    is_distributed,
    is_main_process,
)
from harma.losses import HarmaLoss
from harma.retrieval import RetrievalEvaluator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from processes import spawn_on_free_port  # noqa: E402

WORLD_SIZE = 2
IMAGE_FEATURES, TEXT_FEATURES, EMBED_DIM = 6, 5, 4
# (per-rank batch sizes, HarmaLoss options)
LOSS_CASES = [
    ((4, 4), {}),
    ((3, 5), {"hardest_negative": True, "same_image_positive": True, "affiliation_weight": 0.5}),
]


class TinyDualEncoder(nn.Module):
    """Linear image and text towers with the loss inside, so DDP also averages the temperature."""

    def __init__(self, **loss_options: object) -> None:
        super().__init__()
        self.image_proj = nn.Linear(IMAGE_FEATURES, EMBED_DIM)
        self.text_proj = nn.Linear(TEXT_FEATURES, EMBED_DIM)
        self.criterion = HarmaLoss(**loss_options)

    def forward(
        self, images: torch.Tensor, texts: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        output = self.criterion(self.image_proj(images), self.text_proj(texts), ids, labels)
        affiliation = output.affiliation if output.affiliation is not None else torch.zeros(())
        return output.loss, output.contrastive, output.triplet, affiliation


def global_batch(n: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(n)
    images = torch.randn(n, IMAGE_FEATURES, generator=generator)
    texts = torch.randn(n, TEXT_FEATURES, generator=generator)
    ids = torch.arange(n) // 2  # two captions per image
    labels = torch.arange(n) % 3
    return images, texts, ids, labels


def loss_and_grads(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    losses = model(*batch)
    losses[0].backward()
    module = model.module if isinstance(model, DistributedDataParallel) else model
    result = {name: value.detach() for name, value in zip(("loss", "con", "tri", "aff"), losses, strict=True)}
    result.update({f"grad.{name}": p.grad.detach().clone() for name, p in module.named_parameters()})
    return result


def run_single_process_case(sizes: tuple[int, ...], options: dict) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return loss_and_grads(TinyDualEncoder(**options), global_batch(sum(sizes)))


def init_worker(rank: int, port: int) -> None:
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(WORLD_SIZE),
        }
    )
    torch.set_num_threads(1)
    assert init_distributed_from_env() == (rank, rank, WORLD_SIZE)
    assert is_distributed() and get_rank() == rank and get_world_size() == WORLD_SIZE
    assert is_main_process() == (rank == 0)


def loss_scenario(rank: int, out_dir: Path) -> None:
    results: dict = {}
    for case_index, (sizes, options) in enumerate(LOSS_CASES):
        torch.manual_seed(0)  # same initial weights as the single-process run
        model = DistributedDataParallel(TinyDualEncoder(**options))
        start = sum(sizes[:rank])
        shard = tuple(t[start : start + sizes[rank]] for t in global_batch(sum(sizes)))
        results[case_index] = loss_and_grads(model, shard)

    # Unequal first dims through the gather helpers, and the gradient's routing.
    local = torch.full((rank + 1, 2), float(rank), requires_grad=True)
    gathered = all_gather_with_grad(local)
    (gathered * torch.arange(1.0, 4.0)[:, None]).sum().backward()
    results["gather"] = {
        "values": gathered.detach(),
        "grad": local.grad,
        "no_grad": all_gather_no_grad(torch.tensor([10 * rank + i for i in range(rank + 2)])),
    }
    torch.save(results, out_dir / f"loss_rank{rank}.pt")


@pytest.mark.slow
def test_two_process_loss_and_gradients_match_one_process(two_process_results: Path) -> None:
    per_rank = [torch.load(two_process_results / f"loss_rank{rank}.pt") for rank in range(WORLD_SIZE)]
    for case_index, (sizes, options) in enumerate(LOSS_CASES):
        expected = run_single_process_case(sizes, options)
        for rank_results in per_rank:
            got = rank_results[case_index]
            assert set(got) == set(expected)
            for key, value in expected.items():
                torch.testing.assert_close(
                    got[key], value, atol=1e-5, rtol=1e-5, msg=f"case {case_index}: {key}"
                )

    # rank 0 held 1 row of 0s, rank 1 held 2 rows of 1s; loss weights rows by 1, 2, 3.
    expected_values = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    for rank_results in per_rank:
        torch.testing.assert_close(rank_results["gather"]["values"], expected_values)
        assert rank_results["gather"]["no_grad"].tolist() == [0, 1, 10, 11, 12]
    # Summed over ranks then sliced: each rank gets world_size x d(loss)/d(its rows), which
    # DDP's averaging turns back into the single-process gradient.
    torch.testing.assert_close(per_rank[0]["gather"]["grad"], torch.full((1, 2), 2.0))
    torch.testing.assert_close(per_rank[1]["gather"]["grad"], torch.tensor([[4.0, 4.0], [6.0, 6.0]]))


class TinyClip(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.visual = nn.Linear(12, 8)
        self.token_embedding = nn.EmbeddingBag(40, 8)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images.flatten(1))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(tokens)


def toy_tokenizer(captions: list[str]) -> torch.Tensor:
    return torch.tensor([[ord(ch) % 40 for ch in caption[-5:].rjust(5)] for caption in captions])


def toy_evaluator() -> RetrievalEvaluator:
    generator = torch.Generator().manual_seed(5)
    n_images = 7  # odd: the two shards differ in size
    images = [(torch.randn(3, 2, 2, generator=generator), index) for index in range(n_images)]
    txt2img = [i for i in range(n_images) for _ in range(1 + (i * 5) % 3)]
    captions = [f"caption {j} of image {i}" for j, i in enumerate(txt2img)]
    return RetrievalEvaluator(images, captions, txt2img, toy_tokenizer, batch_size=2, progress=True)


def evaluator_scenario(rank: int, out_dir: Path) -> None:
    torch.manual_seed(0)
    model = DistributedDataParallel(TinyClip())
    evaluator = toy_evaluator()
    metrics = evaluator.evaluate(model)
    image_embeds, text_embeds = evaluator.encode(model)
    torch.save(
        {"metrics": metrics, "images": image_embeds, "texts": text_embeds},
        out_dir / f"eval_rank{rank}.pt",
    )


def toy_zero_shot_evaluator() -> ZeroShotEvaluator:
    generator = torch.Generator().manual_seed(6)
    n_images = 9  # odd: the two shards differ in size
    images = [(torch.randn(3, 2, 2, generator=generator), index % 4) for index in range(n_images)]
    labels = [label for _, label in images]
    # 3 prompts x 4 classes: the 12 prompts are sharded too
    return ZeroShotEvaluator(images, labels, ["lake", "farm", "port", "road"], toy_tokenizer,
                             templates=["{}", "a {}", "the {}"], batch_size=2)


def zero_shot_scenario(rank: int, out_dir: Path) -> None:
    torch.manual_seed(0)
    model = DistributedDataParallel(TinyClip())
    result = toy_zero_shot_evaluator().run(model)
    torch.save({"metrics": result.metrics, "ranks": result.ranks, "confusion": result.confusion},
               out_dir / f"zero_shot_rank{rank}.pt")


def worker(rank: int, port: int, out_dir: str) -> None:
    """One process group for all scenarios: process start-up dominates the run time."""
    init_worker(rank, port)
    try:
        loss_scenario(rank, Path(out_dir))
        evaluator_scenario(rank, Path(out_dir))
        zero_shot_scenario(rank, Path(out_dir))
        dist.barrier(timeout=timedelta(seconds=30))
    finally:
        cleanup_distributed()
    assert not is_distributed()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir = tmp_path_factory.mktemp("two_process")
    spawn_on_free_port(worker, (str(out_dir),), nprocs=WORLD_SIZE)
    return out_dir


@pytest.mark.slow
def test_two_process_evaluation_matches_one_process(two_process_results: Path) -> None:
    torch.manual_seed(0)
    model = TinyClip()
    evaluator = toy_evaluator()
    expected_metrics = evaluator.evaluate(model)
    expected_images, expected_texts = evaluator.encode(model)
    for rank in range(WORLD_SIZE):
        got = torch.load(two_process_results / f"eval_rank{rank}.pt")
        torch.testing.assert_close(got["images"], expected_images)
        torch.testing.assert_close(got["texts"], expected_texts)
        assert got["metrics"] == pytest.approx(expected_metrics)


@pytest.mark.slow
def test_two_process_zero_shot_classification_matches_one_process(two_process_results: Path) -> None:
    torch.manual_seed(0)
    expected = toy_zero_shot_evaluator().run(TinyClip())
    assert 0 < expected.metrics["acc1"] < 100
    for rank in range(WORLD_SIZE):
        got = torch.load(two_process_results / f"zero_shot_rank{rank}.pt")
        assert got["metrics"] == pytest.approx(expected.metrics)
        assert torch.equal(got["ranks"], expected.ranks)
        assert torch.equal(got["confusion"], expected.confusion)


def test_helpers_without_process_group() -> None:
    assert not is_distributed()
    assert (get_rank(), get_world_size(), is_main_process()) == (0, 1, True)
    tensor = torch.randn(3, 2, requires_grad=True)
    assert all_gather_with_grad(tensor) is tensor
    assert not all_gather_no_grad(tensor).requires_grad
    cleanup_distributed()  # no-op


def test_init_without_torchrun_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed_from_env() == (0, 0, 1)
    assert not is_distributed()
