"""Images from a model and judgments of them: ``generate`` (:mod:`.sampling`), ``eval`` (:mod:`.evaluate`), the
evidence a patch records, and the CLIP judge for real models.

Imports :mod:`erasekit.checkpoints`, :mod:`erasekit.format`, :mod:`erasekit.toyworld` and the top-level helpers."""
