"""The model card templates (Jinja over Markdown), read by `hf_moe.cards`.

This folder is installed as the package ``hf_moe.card_templates`` (``[tool.setuptools.package-dir]``
in pyproject.toml), so a wheel carries the templates and an editable install reads them from here.
``examples/`` (not installed) holds cards rendered from a tiny run by ``examples/render_examples.py``.
"""
