"""Training: one generic loop (:func:`fit`), its :class:`History`, checkpoints, saved models.

The step functions of each model family live beside this module, all with one signature,
``step(batch, i, *, <networks>, <optimizers>, <options>) -> dict``; ``fit`` knows none of them.
"""

from .fit import Checkpoint, FuseBlown, History, fit, load_model, read_checked, save_checked, save_model

__all__ = ["fit", "History", "Checkpoint", "FuseBlown", "save_model", "load_model", "save_checked", "read_checked"]
