"""Erasing: the loop (:mod:`.unlearn`), its recipes, conditioning, denoising, training images, low-rank storage
of the result, the ``erase`` job and batches of them (the settings are :mod:`erasekit.format.erase_config`).

Imports everything below it (judging, checkpoints, format, toyworld, the top-level helpers); nothing from the CLI."""
