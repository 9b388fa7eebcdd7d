"""harma: HarMA adapters (harmonized transfer learning and modality alignment) for CLIP-style models.

Typical use:

    import harma, open_clip

    model = open_clip.create_model("ViT-B-32", pretrained="laion2b_s34b_b79k")
    harma.inject_harma_adapters(model, harma.HarmaConfig())
    ...  # train: only adapter parameters require grad
    harma.save_adapters(model, "adapters.safetensors")
"""

__version__ = "0.1.0"

from .checkpoint import (  # noqa: E402
    OfficialCheckpoint,
    load_adapters,
    load_official_checkpoint,
    push_adapters_to_hub,
    read_adapter_file,
    save_adapters,
)
from .config import HarmaConfig  # noqa: E402
from .inject import (  # noqa: E402
    ParameterCount,
    adapter_parameters,
    count_parameters,
    disable_adapters,
    find_towers,
    get_harma_config,
    inject_harma_adapters,
    is_patched,
    print_trainable_parameters,
    remove_harma_adapters,
)
from .losses import HarmaLoss, HarmaLossOutput  # noqa: E402
from .modules import MiniAdapter, MultimodalGatedAdapter  # noqa: E402
from .retrieval import (  # noqa: E402
    RetrievalEvaluator,
    RetrievalRanks,
    retrieval_metrics,
    retrieval_metrics_from_embeddings,
)

__all__ = [
    "HarmaConfig",
    "HarmaLoss",
    "HarmaLossOutput",
    "MiniAdapter",
    "MultimodalGatedAdapter",
    "OfficialCheckpoint",
    "ParameterCount",
    "RetrievalEvaluator",
    "RetrievalRanks",
    "adapter_parameters",
    "count_parameters",
    "disable_adapters",
    "find_towers",
    "get_harma_config",
    "inject_harma_adapters",
    "is_patched",
    "load_adapters",
    "load_official_checkpoint",
    "print_trainable_parameters",
    "push_adapters_to_hub",
    "read_adapter_file",
    "remove_harma_adapters",
    "retrieval_metrics",
    "retrieval_metrics_from_embeddings",
    "save_adapters",
]
