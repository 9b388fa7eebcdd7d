"""Bridges between harma and other libraries.

Each bridge is a submodule that is imported explicitly, so that ``import harma`` never imports
the library a bridge talks to:

* ``harma.integrations.peft``: drive HarMA adapters through peft's API
  (``get_peft_model(model, HarmaPeftConfig())``, ``PeftModel.save_pretrained`` /
  ``from_pretrained``).
"""
