"""The patch format: the ``.erasepatch`` file and its manifest (:mod:`.patchfile`), the erase settings it records
(:mod:`.erase_config`), the names it uses, low-rank storage, the safetensors and float16 helpers, and the files
made for ComfyUI, A1111 and diffusers (:mod:`.ui_export`).

Imports only erasekit's top-level helpers (``errors``, ``_torch``, ``_temps``, ``_version``); torch only lazily."""
