"""Checkpoints: finding the text encoders in every layout and on the hub, loading pipelines, applying and
reverting patches in files (with the undo journal) and in memory, comparing (``diff``) and merging patches.

Imports :mod:`erasekit.format` and the top-level helpers; nothing from judging, erasing, the CLI or testing."""
