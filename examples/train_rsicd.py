"""Train HarMA adapters (or LoRA / full fine-tuning) for RSICD image-text retrieval.

The RSICD training annotations (rsicd_train.json) are not shipped with this project: take
data/finetune/rsicd_train.json from the HarMA authors' repository (see docs/training.md).

    python examples/train_rsicd.py --config examples/configs/rsicd_geo.json \
        --image_root /data/rsicd --pretrained /models/RS5M_ViT-B-32_RET-2.pt
    torchrun --nproc_per_node 2 examples/train_rsicd.py --config examples/configs/rsicd_vit.json

Every recipe field can be overridden as --name value (see --help and docs/training.md).
"""

from __future__ import annotations

from pathlib import Path

from harma.training import main

CONFIGS = Path(__file__).resolve().parent / "configs"

if __name__ == "__main__":
    main(
        defaults=CONFIGS / "rsicd_vit.json",
        prog="train_rsicd.py",
        description="Train on RSICD (defaults: examples/configs/rsicd_vit.json).",
    )
