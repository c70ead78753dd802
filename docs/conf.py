"""Sphinx configuration of the rmge documentation.

Build with ``make docs`` (``sphinx-build -W --keep-going -b html docs docs/_build/html``). The build
needs no network: notebooks are rendered from their stored outputs and no inventories are fetched.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import shutil
import sys
from datetime import date
from importlib.metadata import version as _version
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))

# -- Project information ---------------------------------------------------------------------------
project = "rmge"
author = "rmge developers"
copyright = f"{date.today().year}, {author}"
try:
    release = _version("rmge")
except Exception:  # source tree without installation
    release = "0.0.0"
version = release

# -- General configuration -------------------------------------------------------------------------
extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx_design",
    "sphinxarg.ext",
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
master_doc = "index"
templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints", "_templates"]

# MyST: $-math as in the markdown pages, heading anchors for in-page links such as (#common-options).
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# myst-nb: render the outputs stored in the notebooks; never run them while building.
nb_execution_mode = "off"
nb_merge_streams = True

# autodoc / autosummary / napoleon (numpydoc-style docstrings)
autosummary_generate = True
autosummary_imported_members = True
autosummary_ignore_module_all = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = True
napoleon_use_param = True
# rmge's docstrings describe what a function returns in prose (often with a bullet list of keys)
# rather than as "name : type" entries: render the section as written.
napoleon_custom_sections = ["Returns"]

# No intersphinx: the build must work offline.

# sphinx-argparse's domain cannot resolve "any" cross-references; MyST reports that for every link it
# looks up, which says nothing about the documentation.
suppress_warnings = ["myst.domains"]


def _data_docs() -> dict[str, str]:
    """Doc comments (``#:``) of the data (not functions or classes) that the namespaces export.

    A name imported into a package ``__init__`` loses the doc comment written beside its definition;
    the API pages (``_templates/autosummary/module.rst``) take it from here instead.
    """
    from sphinx.pycode import ModuleAnalyzer

    docs = {}
    for pkg in ("rmge.model", "rmge.pp", "rmge.io", "rmge.tl", "rmge.pl", "rmge.datasets"):
        module = importlib.import_module(pkg)
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if callable(obj) or inspect.ismodule(obj):
                continue
            for info in pkgutil.iter_modules(module.__path__, pkg + "."):
                attr_docs = ModuleAnalyzer.for_module(info.name).find_attr_docs()
                if ("", name) in attr_docs:
                    docs[f"{pkg}.{name}"] = "\n".join(attr_docs[("", name)]).strip()
                    break
    return docs


autosummary_context = {"data_docs": _data_docs()}

# -- HTML output -----------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = "rmge"
html_static_path: list[str] = []
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
}
html_show_sourcelink = False


# -- Build-time hooks ------------------------------------------------------------------------------
def _copy_tutorials() -> None:
    """Copy ``../tutorials/*.ipynb`` into ``docs/tutorials/`` (a build product, git-ignored).

    Sphinx only reads documents under its source folder; the notebooks live at the repository root,
    where they are run and tested.
    """
    src = ROOT / "tutorials"
    dst = HERE / "tutorials"
    dst.mkdir(exist_ok=True)
    wanted = {p.name for p in src.glob("*.ipynb")}
    for stale in dst.glob("*.ipynb"):
        if stale.name not in wanted:
            stale.unlink()
    for nb in sorted(src.glob("*.ipynb")):
        target = dst / nb.name
        if not target.exists() or target.read_bytes() != nb.read_bytes():
            shutil.copyfile(nb, target)


_copy_tutorials()


#: Pages whose names match this pattern, or whose opening paragraphs name a script of ``benchmarks/``
#: (pages a benchmark writes), join the "Benchmarks" section; other unlisted pages join the guide.
_BENCHMARK_PAGE = re.compile(r"^(benchmark|scale)|_results$")


def _is_benchmark_page(name: str) -> bool:
    head = (HERE / f"{name}.md").read_text(encoding="utf-8")[:600]
    return bool(_BENCHMARK_PAGE.search(name)) or "benchmarks/" in head


def _add_unlisted_pages(app, docname: str, source: list[str]) -> None:
    """Add every ``docs/*.md`` page that ``index.md`` does not list to one of its toctrees.

    Guide and benchmark pages can then be added by dropping a markdown file into ``docs/``.
    """
    if docname != "index":
        return
    text = source[0]
    listed = set(re.findall(r"^([A-Za-z0-9_./-]+)\s*$", text, flags=re.M))
    unlisted = sorted(p.stem for p in HERE.glob("*.md") if p.stem != "index" and p.stem not in listed)
    benchmark = {n for n in unlisted if _is_benchmark_page(n)}
    groups = {
        "Benchmarks": [n for n in unlisted if n in benchmark],
        "User guide": [n for n in unlisted if n not in benchmark],
    }
    for caption, names in groups.items():
        if not names:
            continue
        pattern = re.compile(r"(:caption: " + re.escape(caption) + r"\n(?:(?!```).*\n)*?)(```)")
        entries = "".join(f"{name}\n" for name in names)
        text, n = pattern.subn(lambda m, entries=entries: m.group(1) + entries + m.group(2), text, count=1)
        if n != 1:
            raise RuntimeError(f"docs/index.md has no toctree captioned {caption!r} to add {names} to.")
    source[0] = text


def setup(app):
    """Register the build-time hooks."""
    app.connect("source-read", _add_unlisted_pages)
    return {"parallel_read_safe": True}
