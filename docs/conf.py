"""Sphinx configuration of the aiomas documentation.

Build it with ``python -m sphinx -W -b html docs docs/_build/html`` (after
``pip install -e '.[docs]'``); CI does the same with warnings as errors.  The
build needs no network.
"""

import aiomas

project = "aiomas"
author = "The aiomas developers"
copyright = "2014-2017 Stefan Scherfke (aiomas 1.x), 2026 the aiomas developers"
version = release = aiomas.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]

exclude_patterns = ["_build"]
html_theme = "furo"
html_title = f"aiomas {release}"
html_static_path: list[str] = []

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# Doctest blocks are shown as Python sessions; nothing is run during the build
# (pytest runs them).
highlight_language = "python3"
