"""Train HarMA adapters (or LoRA / full fine-tuning) for RSITMD image-text retrieval.

    python examples/train_rsitmd.py --config examples/configs/rsitmd_geo.json \
        --image_root /data/rsitmd --pretrained /models/RS5M_ViT-B-32_RET-2.pt
    torchrun --nproc_per_node 2 examples/train_rsitmd.py --config examples/configs/rsitmd_vit.json
    python examples/train_rsitmd.py --resume runs/rsitmd_vit    # continue an interrupted run

Every recipe field can be overridden as --name value (see --help and docs/training.md).
"""

from __future__ import annotations

from pathlib import Path

from harma.training import main

CONFIGS = Path(__file__).resolve().parent / "configs"

if __name__ == "__main__":
    main(
        defaults=CONFIGS / "rsitmd_vit.json",
        prog="train_rsitmd.py",
        description="Train on RSITMD (defaults: examples/configs/rsitmd_vit.json).",
    )
