"""Lightning callbacks of gradprune, installed as ``gradprune.callbacks``.

Callbacks decide *when* to prune; the core in :mod:`gradprune` decides *what*.
"""
__all__: list[str] = []
