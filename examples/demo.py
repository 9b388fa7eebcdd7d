"""The CPU demo on generated data, about two minutes on two cores, nothing downloaded: pre-train
a small CLIP on a synthetic "source" domain, train HarMA adapters on a shifted "target" domain,
report retrieval before and after, and reload the saved adapter file.

    python examples/demo.py                       # output in runs/demo
    python examples/demo.py --output_dir /tmp/demo

The same as ``python -m harma.training.demo`` and ``make demo``.
"""

from harma.training.demo import main

if __name__ == "__main__":
    main()
