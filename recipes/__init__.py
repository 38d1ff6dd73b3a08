"""The recipes, importable as modules from the repository root (``import recipes.finetune_clm``) by the studies.

Each recipe is still a script (``python recipes/finetune_clm.py``, ``accelerate launch recipes/finetune_clm.py``).
``recipes/accelerate/`` holds launch configs and has no ``__init__.py``: it never shadows the accelerate package.
"""
