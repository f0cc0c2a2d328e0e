"""distrain: launch and run distributed PyTorch training.

The same training script runs unchanged under ``torchrun``, ``distrain launch`` (one node or
many) and ``distrain launch --launcher ray``. See README.md for the tour.
"""

__version__ = "0.1.0"
