"""The generated references (docs/rpc.md, docs/metrics.md) match the code.

The reference cannot drift: adding a method, a parameter or a metric family without
regenerating fails here with the command that fixes it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from blocktarget import docgen
from blocktarget.cli import main

DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.mark.parametrize("what", sorted(docgen.GENERATORS))
def test_committed_reference_is_current(what: str) -> None:
    fname, generate = docgen.GENERATORS[what]
    path = DOCS / fname
    assert path.exists(), f"{path} is missing: run `{docgen.REGENERATE}`"
    assert path.read_text(encoding="utf-8") == generate(), (
        f"{path} is stale (the code changed since it was generated): run "
        f"`{docgen.REGENERATE}` (or `.venv/bin/blocktarget docs`) and commit the result")


def test_rpc_reference_lists_every_method_and_parameter() -> None:
    text = docgen.rpc_reference()
    for d in docgen.method_docs():
        assert f"\n## {d['name']}\n" in text
        for p in d["params"]:
            assert f"| `{p['name']}` |" in text
        for a in d["aliases"]:
            assert f"`{a}`" in text


def test_metrics_reference_lists_every_family_with_exposed_names() -> None:
    text = docgen.metrics_reference()
    assert "| `blocktarget_bdev_ops_total` | counter | `bdev`, `type` |" in text
    assert "`blocktarget_bdev_io_latency_seconds_bucket`" in text
    assert "| `blocktarget_info` | info | `version`, `pid` |" in text


def test_cli_check_reports_stale_and_write_fixes_it(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "rpc.md").write_text("old\n")
    assert main(["docs", "rpc", "--check", "-o", str(tmp_path)]) == 1
    assert docgen.REGENERATE in capsys.readouterr().err
    assert (tmp_path / "rpc.md").read_text() == "old\n"  # --check writes nothing
    assert main(["docs", "rpc", "-o", str(tmp_path)]) == 0
    assert main(["docs", "rpc", "--check", "-o", str(tmp_path)]) == 0
    assert (tmp_path / "rpc.md").read_text() == docgen.rpc_reference()


def test_cli_missing_out_dir_is_a_clear_error(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["docs", "-o", str(tmp_path / "nope")]) == 2
    assert "not a directory" in capsys.readouterr().err


def _setting_keys() -> dict[str, set[str]]:
    """The keys config.py accepts, read from its `set(x) - {...}` checks and _HTTP_KEYS
    (there is no schema object to ask), by the dotted prefix they live under."""
    import ast

    import blocktarget.config as config

    tree = ast.parse(Path(config.__file__).read_text(encoding="utf-8"))
    prefixes = {"bt": "", "rpc": "rpc.", "poll": "poll."}
    found: dict[str, set[str]] = {"rpc.http.": set(config._HTTP_KEYS)}
    for node in ast.walk(tree):
        if (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Sub)
                and isinstance(node.right, ast.Set) and isinstance(node.left, ast.Call)
                and getattr(node.left.func, "id", "") == "set" and node.left.args
                and isinstance(node.left.args[0], ast.Name)
                and node.left.args[0].id in prefixes):
            keys = {e.value for e in node.right.elts if isinstance(e, ast.Constant)}
            found.setdefault(prefixes[node.left.args[0].id], set()).update(keys)
    return found


def test_readme_config_reference_names_every_setting() -> None:
    readme = (DOCS.parent / "README.md").read_text(encoding="utf-8")
    keys = _setting_keys()
    assert keys.get("") and keys.get("rpc."), "config.py's setting checks moved: update this test"
    missing = [f"{prefix}{k}" for prefix, names in keys.items() for k in sorted(names)
               if f"`{prefix}{k}`" not in readme and f"`{prefix}{k}." not in readme]
    assert not missing, (f"README.md's config table does not document {missing}: add a row "
                         "to the `blocktarget` settings table")
