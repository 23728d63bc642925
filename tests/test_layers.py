"""The package's layers only point down and no modules of any package import each other in a cycle: the
import-linter contracts of pyproject.toml ([tool.importlinter]), checked as `lint-imports` checks them."""


from importlinter.cli import lint_imports

from tests.helpers import ROOT

PYPROJECT = ROOT / "pyproject.toml"


def test_every_import_contract_is_kept(capsys):
    code = lint_imports(config_filename=str(PYPROJECT), no_cache=True, no_logo=True)
    report = capsys.readouterr().out
    assert code == 0, report
    assert "0 broken" in report
