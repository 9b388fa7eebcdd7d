"""peft's own generic tuner tests (``PeftCommonTester`` from peft's test suite) run on HarMA.

peft checks every one of its methods with the helpers of ``tests/testing_common.py``, which its
source release carries and its wheel does not; ``make install`` fetches that file for the installed
peft version (``.ci/fetch_peft_tests.py``) into the virtual environment. Here the helpers run on a
tiny open_clip CLIP whose forward pass takes ``input_ids`` and ``pixel_values`` and returns the
image-text logits, with ``HarmaPeftConfig(init_weights=False)`` so that adapters change the output
from the start, as peft's tests of other methods do.

The helpers that do not apply to HarMA are listed in ``NOT_APPLICABLE`` with the reason.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from tiny_models import IMAGE_SIZE, images, tiny_open_clip, tokens

pytest.importorskip("peft")
HELPERS = Path(sys.prefix) / "peft-tests"
if not (HELPERS / "peft_common_tests" / "testing_common.py").is_file():
    pytest.skip(f"peft's test helpers are not in {HELPERS}: run `python .ci/fetch_peft_tests.py` "
                f"(make install does)", allow_module_level=True)
sys.path.insert(0, str(HELPERS))
from open_clip.model import CLIP  # noqa: E402
from peft_common_tests.testing_common import PeftCommonTester  # noqa: E402

from harma.integrations.peft import HarmaPeftConfig  # noqa: E402

MODEL_ID = "tiny-open-clip"
CONFIGS = {"reference": {"init_weights": False}, "paper": {"init_weights": False, "sharing": "paper"}}

APPLICABLE = (
    "_test_model_attr",
    "_test_adapter_name",
    "_test_save_pretrained",
    "_test_save_pretrained_selected_adapters",
    "_test_save_pretrained_adapter_name_substring",
    "_test_from_pretrained_config_construction",
    "_test_load_multiple_adapters",
    "_test_training",
    "_test_inference_safetensors",
    "_test_delete_adapter",
    "_test_delete_inactive_adapter",
    "_test_delete_unknown_adapter_raises",
    "_test_unload_adapter",
    "_test_get_base_model_state_dict",
)

NOT_APPLICABLE = {
    "_test_prepare_for_training": "needs a transformers model's input embeddings (get_input_embeddings)",
    "_test_load_model_low_cpu_mem_usage": "HarMA refuses low_cpu_mem_usage=True with a clear error (test_peft.py)",
    "_test_merge_layers": "HarMA adapters cannot be merged (attention, GELU, gates); merging is refused",
    "_test_merge_layers_fp16": "merging is refused",
    "_test_merge_layers_nan": "merging is refused",
    "_test_merge_layers_multi": "merging is refused",
    "_test_merge_layers_is_idempotent": "merging is refused",
    "_test_safe_merge": "merging is refused",
    "_test_weighted_combination_of_adapters": "add_weighted_adapter is refused (test_peft_conformance.py)",
    "_test_mixed_adapter_batches": "skips every method but LoRA and RoAd and needs generate(); HarMA's mixed "
                                   "batches are tested in test_peft_conformance.py",
    "_test_generate": "needs generate() (a language model)",
    "_test_disable_adapter": "calls generate() on every PeftModel (written for language models); "
                             "disable_adapter is tested in test_peft.py and test_peft_conformance.py",
    "_test_generate_pos_args": "needs generate()",
    "_test_generate_half_prec": "needs generate()",
    "_test_generate_with_mixed_adapter_batches_and_beam_search": "needs generate()",
    "_test_training_layer_indexing": "LoRA's layers_to_transform (HarMA's HarmaPeftConfig.layers is tested "
                                     "in test_peft.py)",
    "_test_training_gradient_checkpointing": "needs transformers' gradient_checkpointing_enable",
    "_test_peft_model_device_map": "needs accelerate's device_map on a transformers model",
    "_test_training_prompt_learning_tasks": "prompt learning only",
    "_test_adding_multiple_adapters_with_bias_raises": "LoRA's bias option",
    "_test_passing_input_embeds_works": "needs a transformers model's inputs_embeds",
    "_test_lora_conversion": "LoRA conversion of other methods",
    "_test_add_adapter_no_autocast_adapter_dtype": "tested with HarMA's own model in test_peft_conformance.py",
    "_test_weighted_combination_of_adapters_lora": "LoRA only",
    "_test_weighted_combination_of_adapters_ia3": "IA3 only",
}


class LogitsClip(CLIP):
    """open_clip's CLIP with the forward pass peft's helpers call: keyword inputs, one tensor out."""

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        image_features, text_features, logit_scale = super().forward(pixel_values, input_ids)
        return logit_scale * image_features @ text_features.T


class TinyClipLoader:
    """What peft's helpers call ``transformers_class``: ``from_pretrained`` builds the same tiny CLIP
    each time."""

    @classmethod
    def from_pretrained(cls, model_id: str, dtype: torch.dtype | None = None) -> LogitsClip:
        assert model_id == MODEL_ID
        return tiny_open_clip(model_class=LogitsClip).to(dtype or torch.float32)


class TestHarmaWithPeftsCommonTests(PeftCommonTester):
    transformers_class = TinyClipLoader
    torch_device = "cpu"

    def prepare_inputs_for_testing(self) -> dict[str, torch.Tensor]:
        return {"input_ids": tokens(3), "pixel_values": images(3)}

    @pytest.mark.parametrize("layout", sorted(CONFIGS))
    @pytest.mark.parametrize("helper", APPLICABLE)
    def test_helper(self, helper, layout):
        getattr(self, helper)(MODEL_ID, HarmaPeftConfig, dict(CONFIGS[layout]))


def test_every_helper_is_run_or_listed_with_its_reason():
    helpers = {name for name in dir(PeftCommonTester) if name.startswith("_test_")}
    assert helpers == set(APPLICABLE) | set(NOT_APPLICABLE), helpers ^ (set(APPLICABLE) | set(NOT_APPLICABLE))
    assert IMAGE_SIZE  # the inputs above are the tiny models' own sizes
