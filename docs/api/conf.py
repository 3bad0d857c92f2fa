"""Sphinx configuration of fastattn's API reference (built from the
docstrings, numpydoc style):

    python -m sphinx -W -b html docs/api docs/api/_build

CI builds it with warnings as errors (-W), so a docstring that does not
parse fails the build.
"""

import os
import sys

# the package as this checkout holds it (built in place, or installed)
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

project = "fastattn"
author = "the fastattn authors"
copyright = "2026, the fastattn authors"

extensions = ["sphinx.ext.autodoc", "numpydoc"]
# numpydoc lists class members itself from the docstrings' sections; the
# autosummary tables it would add need stub pages this reference does not have
numpydoc_show_class_members = False
numpydoc_validation_checks = set()
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # the numpydoc sections say the types
nitpicky = False
html_theme = "alabaster"
exclude_patterns = ["_build"]
