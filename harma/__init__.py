"""harma: HarMA adapters (harmonized transfer learning and modality alignment) for CLIP-style models.

Typical use:

    import harma, open_clip

    model = open_clip.create_model("ViT-B-32", pretrained="laion2b_s34b_b79k")
    harma.inject_harma_adapters(model, harma.HarmaConfig())
    ...  # train: only adapter parameters require grad
    harma.save_adapters(model, "adapters.safetensors")
"""

from ._version import __version__ as __version__
from .checkpoint import load_adapters, push_adapters_to_hub, read_adapter_file, save_adapters
from .classification import ClassificationResult, ZeroShotEvaluator, classification_metrics
from .config import HarmaConfig
from .inject import (
    ParameterCount,
    adapter_parameters,
    count_parameters,
    disable_adapters,
    find_towers,
    get_harma_config,
    inject_harma_adapters,
    is_patched,
    print_trainable_parameters,
)
from .losses import HarmaLoss, HarmaLossOutput
from .modules import MiniAdapter, MultimodalGatedAdapter
from .named_adapters import (
    active_adapter,
    delete_adapter,
    list_adapters,
    mixed_adapter_batch,
    remove_harma_adapters,
    set_adapter,
)
from .official import OfficialCheckpoint, load_official_checkpoint
from .retrieval import (
    RetrievalEvaluator,
    RetrievalRanks,
    retrieval_metrics,
    retrieval_metrics_from_embeddings,
)

__all__ = [
    "ClassificationResult",
    "HarmaConfig",
    "HarmaLoss",
    "HarmaLossOutput",
    "MiniAdapter",
    "MultimodalGatedAdapter",
    "OfficialCheckpoint",
    "ParameterCount",
    "RetrievalEvaluator",
    "RetrievalRanks",
    "ZeroShotEvaluator",
    "active_adapter",
    "adapter_parameters",
    "classification_metrics",
    "count_parameters",
    "delete_adapter",
    "disable_adapters",
    "find_towers",
    "get_harma_config",
    "inject_harma_adapters",
    "is_patched",
    "list_adapters",
    "load_adapters",
    "load_official_checkpoint",
    "mixed_adapter_batch",
    "print_trainable_parameters",
    "push_adapters_to_hub",
    "read_adapter_file",
    "remove_harma_adapters",
    "retrieval_metrics",
    "retrieval_metrics_from_embeddings",
    "save_adapters",
    "set_adapter",
]
