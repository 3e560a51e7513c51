"""Round 28: lightning_act as installed from a wheel or an sdist.

A logger whose package is missing gets one line with the cause and the pip command; ``lightning_act monitors`` finds
the recipes of the checkout it runs in; the sdist ships what its tests need; the license is an SPDX expression.
"""

import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from lightning_act.cli import condense_instantiation_error, main

ROOT = Path(__file__).resolve().parents[1]

# --- a logger whose package is missing ----------------------------------------------------------------------------

# What Lightning's WandbLogger / MLFlowLogger raise without their package (RequirementCache's text).
REQUIREMENT = "Requirement 'fakepkg>=1.0' not met. HINT: Try running `pip install -U 'fakepkg>=1.0'`"
UNION_HEAD = (
    "Does not validate against any of the Union subtypes\n"
    "Subtypes: [<class 'lightning.pytorch.loggers.logger.Logger'>, "
    "collections.abc.Iterable[lightning.pytorch.loggers.logger.Logger], <class 'bool'>, <class 'NoneType'>]\n"
    "Errors:\n"
)
# jsonargparse's messages, as captured from `lightning_act fit --trainer.logger ...` with the stand-in logger below
LIST_FORM = UNION_HEAD + (
    "  - Not a valid subclass of Logger. Got value: [Namespace(class_path='lightning.pytorch.loggers.CSVLogger', "
    "init_args=Namespace(save_dir='runs')), Namespace(class_path='standin_r28.NeedsFakepkgLogger', "
    "init_args=Namespace(save_dir='x'))]\n"
    "    Subclass types expect one of:\n"
    "    - a class path (str)\n"
    "    - a dict with class_path entry\n"
    "  - Problem with given class_path 'standin_r28.NeedsFakepkgLogger':\n"
    f"      {REQUIREMENT}\n"
    "  - Expected a <class 'bool'>\n"
    "  - Expected a <class 'NoneType'>\n"
    "Given value type: <class 'list'>\n"
    "Given value: [<lightning.pytorch.loggers.csv_logs.CSVLogger object at 0x7f>, Namespace(...)]\n"
)
SINGLE_FORM = UNION_HEAD + (
    "  - Problem with given class_path 'standin_r28.NeedsFakepkgLogger':\n"
    f"      {REQUIREMENT}\n"
    "  - Expected a <class 'collections.abc.Iterable'>\n"
    "  - Expected a <class 'bool'>\n"
    "  - Expected a <class 'NoneType'>\n"
    "Given value type: <class 'jsonargparse._namespace.Namespace'>\n"
    "Given value: Namespace(class_path='standin_r28.NeedsFakepkgLogger', init_args=Namespace(save_dir='x'))\n"
)
EXPECTED_LINE = f"trainer.logger (NeedsFakepkgLogger): {REQUIREMENT}"


@pytest.mark.parametrize("message", [LIST_FORM, SINGLE_FORM], ids=["list", "single"])
def test_a_missing_logger_package_is_named_with_its_pip_command(message):
    # Before: "trainer: Not a valid subclass of Logger. Got value: [...]" (list) and
    # "trainer: Problem with given class_path 'standin_r28.NeedsFakepkgLogger':" (single: the cause was cut off)
    assert condense_instantiation_error(message) == EXPECTED_LINE


def test_a_module_missing_in_a_constructor_is_named_with_what_to_install():
    message = SINGLE_FORM.replace(REQUIREMENT, "No module named 'fakepkg_backend'")
    assert condense_instantiation_error(message) == (
        "trainer.logger (NeedsFakepkgLogger): No module named 'fakepkg_backend'; install the package that provides "
        "module 'fakepkg_backend'")


def test_an_item_naming_no_class_is_still_the_line():
    """Without a class_path item, the first item that is not another Union type's refusal."""
    message = UNION_HEAD + (
        "  - Not a valid subclass of Logger. Got value: 3\n"
        "  - Expected a <class 'bool'>\n"
        "  - save_dir must be a folder\n"
        "Given value: 3\n"
    )
    assert condense_instantiation_error(message) == "trainer.logger: save_dir must be a folder"


@pytest.mark.parametrize("form", ["list", "single"])
def test_the_cli_names_a_missing_logger_package_and_its_pip_command(form, tmp_path, monkeypatch, capsys):
    """The real command, with a logger whose constructor raises what WandbLogger raises without wandb."""
    (tmp_path / "standin_r28.py").write_text(textwrap.dedent(f'''
        from lightning.pytorch.loggers import Logger

        class NeedsFakepkgLogger(Logger):
            """A logger whose backing package is not installed (as WandbLogger without wandb)."""
            def __init__(self, save_dir: str = "x") -> None:
                raise ModuleNotFoundError({REQUIREMENT!r})
            name = "n"
            version = 0
            def log_metrics(self, metrics, step=None): pass
            def log_hyperparams(self, params, *args, **kwargs): pass
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    config = yaml.safe_load((ROOT / "recipes" / "vit_demo.yaml").read_text())
    standin = {"class_path": "standin_r28.NeedsFakepkgLogger"}
    csv = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "runs")}}
    config["trainer"]["logger"] = [csv, standin] if form == "list" else standin
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    try:
        assert main(["fit", "--config", str(tmp_path / "bad.yaml")]) == 2
    finally:
        sys.modules.pop("standin_r28", None)  # the other form's test writes its own
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1] == f"lightning_act: error: {EXPECTED_LINE}"


# --- lightning_act monitors: where the recipes are -----------------------------------------------------------------

def recipe_lines(tmp_path, monkeypatch, beside_is_checkout: bool, cwd_recipes: bool) -> list[str]:
    """catalog_lines' recipe section for a package at tmp_path/pkg (a checkout when it holds pyproject.toml, else
    an install whose site-packages holds another distribution's recipes/) run from tmp_path/work."""
    import lightning_act.catalog as catalog

    beside = tmp_path / "pkg" / "recipes"
    beside.mkdir(parents=True)
    (beside / "beside_recipe.yaml").write_text("# the recipe beside the package\n")
    if beside_is_checkout:
        (tmp_path / "pkg" / "pyproject.toml").write_text("[project]\n")
    work = tmp_path / "work"
    (work / "recipes").mkdir(parents=True)
    if cwd_recipes:
        (work / "recipes" / "cwd_recipe.yaml").write_text("# the recipe in the working folder\n")
    monkeypatch.setattr(catalog, "RECIPES", beside)
    monkeypatch.chdir(work)
    lines = catalog.catalog_lines()
    return lines[next(i for i, line in enumerate(lines) if line.startswith("recipes")):]


def test_an_installed_package_lists_the_recipes_of_the_checkout_it_runs_in(tmp_path, monkeypatch):
    # Before: site-packages/recipes (another distribution's) was listed, and ./recipes never looked at
    lines = recipe_lines(tmp_path, monkeypatch, beside_is_checkout=False, cwd_recipes=True)
    assert lines[0] == "recipes (lightning_act fit --config recipes/NAME.yaml):"
    assert [line.split()[0] for line in lines[1:]] == ["cwd_recipe"]


def test_the_checkout_beside_the_package_comes_first_with_a_path_that_works_from_here(tmp_path, monkeypatch):
    lines = recipe_lines(tmp_path, monkeypatch, beside_is_checkout=True, cwd_recipes=True)
    # Before: "--config recipes/NAME.yaml", which names ./recipes, not the listed folder
    assert lines[0] == f"recipes (lightning_act fit --config {tmp_path / 'pkg' / 'recipes'}/NAME.yaml):"
    assert [line.split()[0] for line in lines[1:]] == ["beside_recipe"]


def test_no_recipes_anywhere_says_where_to_run(tmp_path, monkeypatch):
    lines = recipe_lines(tmp_path, monkeypatch, beside_is_checkout=False, cwd_recipes=False)
    assert lines == [
        "recipes: none here (this is an installed package; the recipes are the YAML files in recipes/ of the source "
        "tree: run lightning_act in a checkout (the folder holding recipes/), or pass --config with your copy)"]


# --- the sdist and the license ---------------------------------------------------------------------------------------

def test_the_sdist_manifest_ships_the_tests_helpers_recipes_docs_and_scripts(monkeypatch):
    """MANIFEST.in applied as setuptools' sdist applies it, to this tree. Before: no MANIFEST.in, so the sdist held
    tests/test_*.py without _toy.py / conftest.py (its tests failed at collection) and no recipes/, docs/, scripts/."""
    from setuptools.command.egg_info import FileList

    monkeypatch.chdir(ROOT)
    files = FileList()
    files.findall()
    for line in (ROOT / "MANIFEST.in").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            files.process_template_line(line)
    shipped = set(files.files)
    needed = {"LICENSE", "README.md", "mkdocs.yml", "tests/conftest.py", "tests/_toy.py", "tests/_hopper.py",
              "tests/_interpreter.py", "scripts/errors_table.py", "docs/errors.md", "recipes/kat.yaml"}
    needed |= {str(path.relative_to(ROOT)) for path in (ROOT / "tests").glob("*.py")}
    assert needed - shipped == set()
    assert not [name for name in shipped if name.endswith(".pyc")]


def test_the_license_is_an_spdx_expression_with_its_text_shipped():
    """Before: license = {text = ...} (setuptools stops building it after 2027-02-18) and no license text."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    assert project["project"]["license-files"] == ["LICENSE"]
    assert project["build-system"]["requires"] == ["setuptools>=77.0.1"]  # the first with PEP 639's fields
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "END OF TERMS AND CONDITIONS" in text
