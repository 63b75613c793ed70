"""Packaging: the sdist holds what a build needs, the torch that builds is the
torch that runs, and import says in one line why the compiled kernels are not
used. (.ci/run installs the sdist into a fresh venv; these are the fast checks.)"""
import importlib.metadata
import json
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile

import pytest
import torch

import torch_safebn
from torch_safebn import _extension

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXTENSION = ROOT / "torch_safebn" / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))


def test_isolated_builds_use_the_tested_torch():
    build_requires = re.search(r"^requires = \[(.*)\]", (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    tested = re.search(r"^torch==(\S+)", (ROOT / "requirements-dev.txt").read_text(), re.M).group(1)
    assert f'"torch=={tested}"' in build_requires


def test_sdist_holds_every_tracked_source(tmp_path):
    listed = subprocess.run(["git", "ls-files", "csrc", "torch_safebn", "setup.py", "pyproject.toml", "README.md"],
                            cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True)
    (sdist,) = tmp_path.glob("torch_safebn-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert set(listed.stdout.split()) - names == set()
    assert "torch_safebn/_build_info.py" not in names
    assert not [name for name in names if name.endswith((".so", ".pyc")) or name.startswith("tests/")]


def test_the_build_names_the_running_torch():
    if torch_safebn.backend() == "reference":
        pytest.skip("the extension is not built")
    assert _extension.built_for() == torch.__version__


@pytest.mark.parametrize("url, command", [
    ({"url": "file:///src/torch_safebn-0.1.0.tar.gz", "archive_info": {}},
     "pip install --no-build-isolation --force-reinstall --no-deps /src/torch_safebn-0.1.0.tar.gz"),
    ({"url": "file:///work/my%20checkout", "dir_info": {"editable": True}},
     "pip install --no-build-isolation -e '/work/my checkout'"),
    (None, "pip install --no-build-isolation --force-reinstall --no-deps <a torch_safebn checkout or sdist>"),
])
def test_the_rebuild_command_names_where_it_was_installed_from(monkeypatch, url, command):
    class Distribution:
        def read_text(self, name):
            return json.dumps(url) if name == "direct_url.json" and url else None
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: Distribution())
    assert _extension.rebuild_command() == command


def _import_copy(tmp_path, extension=None, built_for=None):
    """Imports a copy of the package, with the given _C (bytes) and build
    record, in a fresh interpreter: its backend, whether _C was loaded, and
    torch_safebn's warnings."""
    package = tmp_path / "torch_safebn"
    shutil.copytree(ROOT / "torch_safebn", package,
                    ignore=shutil.ignore_patterns("_C*.so", "_build_info.py", "__pycache__"))
    if extension is not None:
        (package / EXTENSION.name).write_bytes(extension)
    if built_for is not None:
        (package / "_build_info.py").write_text(f"TORCH_VERSION = {built_for!r}\n")
    code = """if True:
        import json, sys, warnings
        # an editable install finds the checkout's modules where the copy lacks them
        sys.meta_path[:] = [f for f in sys.meta_path if not f.__module__.startswith("__editable__")]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch_safebn
        assert torch_safebn.__file__.startswith(sys.argv[1]), torch_safebn.__file__
        print(json.dumps([torch_safebn.backend(), "torch_safebn._C" in sys.modules,
                          [str(w.message) for w in caught if str(w.message).startswith("torch_safebn")]]))"""
    result = subprocess.run([sys.executable, "-c", code, str(package)], cwd=tmp_path,
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def test_a_missing_extension_is_named_as_such(tmp_path):
    backend, loaded, (message,) = _import_copy(tmp_path)
    assert (backend, loaded) == ("reference", False)
    assert f"the compiled extension is not built (no _C*.so in {tmp_path / 'torch_safebn'})" in message
    assert "circular import" not in message
    assert "pip install --no-build-isolation" in message and "\n" not in message


def test_an_extension_built_for_another_torch_is_not_loaded(tmp_path):
    built = EXTENSION.read_bytes() if EXTENSION.exists() else None
    backend, loaded, (message,) = _import_copy(tmp_path, extension=built, built_for="2.0.0+cu118")
    assert (backend, loaded) == ("reference", False)
    assert f"built for torch 2.0.0+cu118, running torch {torch.__version__}; rebuild it: pip install" in message
    assert "\n" not in message


def test_an_extension_that_does_not_load_is_named_with_the_loaders_reason(tmp_path):
    backend, loaded, (message,) = _import_copy(tmp_path, extension=b"not a shared library", built_for=torch.__version__)
    assert (backend, loaded) == ("reference", False)
    assert f"the compiled extension did not load ({tmp_path / 'torch_safebn' / EXTENSION.name}: " in message
    assert "pip install --no-build-isolation" in message and "\n" not in message
