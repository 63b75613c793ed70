"""Loads the compiled kernels, torch_safebn._C, and says in one line why when
they cannot be used. A C++ extension runs only with the torch it was built
against (torch's C++ ABI changes between releases), so setup.py records that
torch in _build_info.py beside _C, and an extension built for another torch
is not loaded at all: the reference implementation runs instead."""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import os
import shlex
import urllib.parse

import torch


def _build_info(name: str) -> str | None:
    """What setup.py recorded about _C's build under `name`, or None where it
    did not (no build yet, or a build by an older setup.py)."""
    try:
        build_info = importlib.import_module("._build_info", __package__)
    except ModuleNotFoundError:
        return None
    return getattr(build_info, name, None)


def built_for() -> str | None:
    """The torch version _C was built against, or None."""
    return _build_info("TORCH_VERSION")


def built_from() -> str | None:
    """The commit _C was built from ("+changes" where its compiled sources
    differed from it), or None (an sdist, an older build)."""
    return _build_info("SOURCE_COMMIT")


def load() -> str | None:
    """Imports _C, which registers the kernels of the safebn ops. Returns None
    when it did, else why not and the command that fixes it, in one line."""
    built = built_for()
    if built is not None and built != torch.__version__:
        return (f"the compiled extension was built for torch {built}, running torch {torch.__version__}; "
                f"rebuild it: {rebuild_command()}")
    package_dir = os.path.dirname(os.path.abspath(__file__))
    if importlib.util.find_spec("._C", __package__) is None:
        return f"the compiled extension is not built (no _C*.so in {package_dir}); build it: {rebuild_command()}"
    try:
        importlib.import_module("._C", __package__)
    except ImportError as error:  # the dynamic loader's message: a missing library or symbol
        return f"the compiled extension did not load ({error}); rebuild it: {rebuild_command()}"
    return None


def rebuild_command() -> str:
    """The pip command that rebuilds torch_safebn against the torch installed
    now, from the checkout or sdist it was installed from, which pip records
    (PEP 610's direct_url.json)."""
    source, editable = "<a torch_safebn checkout or sdist>", False
    try:
        direct_url = importlib.metadata.distribution("torch_safebn").read_text("direct_url.json")
    except importlib.metadata.PackageNotFoundError:
        direct_url = None
    if direct_url:
        origin = json.loads(direct_url)
        url = urllib.parse.urlsplit(origin["url"])
        source = shlex.quote(urllib.parse.unquote(url.path) if url.scheme == "file" else origin["url"])
        editable = origin.get("dir_info", {}).get("editable", False)
    # --no-build-isolation: build against this torch, not a fresh one;
    # --force-reinstall: the same version is installed; --no-deps: keep this torch.
    options = "-e" if editable else "--force-reinstall --no-deps"
    return f"pip install --no-build-isolation {options} {source}"
