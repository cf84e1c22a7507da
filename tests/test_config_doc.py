"""The key tables of docs/configuration.md and docs/cloud_sync.md are generated from the config models
(`python docs/configdoc.py`): the committed documents must be exactly what the models give, every key must say what
it means, and the generator must notice a stale table, a missing block and a broken marker."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from agent.config import AgentConfig
from cloud_sync.config import CloudConfig
from harvester_common.configdoc import DocError, fill, key_table, stale, undocumented

REPO = Path(__file__).resolve().parents[1]


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("configdoc_script", REPO / "docs" / "configdoc.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


DOCS: dict[Path, dict[str, str]] = _script().documents()


@pytest.mark.parametrize("path", sorted(DOCS), ids=lambda p: p.name)
def test_committed_docs_are_what_the_models_give(path: Path) -> None:
    diff = stale(path, DOCS[path])
    assert not diff, (f"{path.relative_to(REPO)} differs from the config models: run `python docs/configdoc.py` and "
                      f"commit the result.\n{diff}")


def test_the_check_command_agrees() -> None:
    done = subprocess.run([sys.executable, str(REPO / "docs" / "configdoc.py"), "--check"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("root", [AgentConfig, CloudConfig], ids=lambda m: m.__name__)
def test_every_key_has_a_description(root: type[BaseModel]) -> None:
    assert undocumented(root) == [], "keys without a description (the doc text): Field(..., description=...)"


def test_every_section_is_documented() -> None:
    agent_doc = DOCS[REPO / "docs" / "configuration.md"]
    assert set(agent_doc) == {f"agent.{s}" for s in AgentConfig.model_fields if s != "sim"}
    table = DOCS[REPO / "docs" / "cloud_sync.md"]["cloud_sync"]
    for section, field in CloudConfig.model_fields.items():
        model = field.annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        for key in model.model_fields:
            assert f"| `[{section}] {key}` |" in table


def test_a_stale_default_is_caught(tmp_path: Path) -> None:
    path = REPO / "docs" / "configuration.md"
    row = "| `queue_max_batches` | `2000` |"
    assert row in path.read_text()
    copy = tmp_path / "configuration.md"
    copy.write_text(path.read_text().replace(row, "| `queue_max_batches` | `1000` |"))
    diff = stale(copy, DOCS[path])
    assert "-| `queue_max_batches` | `1000` |" in diff and "+| `queue_max_batches` | `2000` |" in diff


class _Demo(BaseModel):
    count: int = Field(3, ge=1, le=5, description="how many")
    wait_s: float = Field(0.5, gt=0, description="how long")
    share: float = Field(0.9, gt=0, lt=1, description="how much")
    mode: Literal["a", "b"] = Field("a", description="which")
    name: str = Field("x", pattern=r"^(x|y)$", min_length=1, max_length=8, description="a | in text")
    path: Path | None = Field(None, description="")


def test_a_table_renders_defaults_ranges_and_descriptions() -> None:
    assert key_table(_Demo).splitlines() == [
        "| key | default | allowed | meaning |",
        "| --- | --- | --- | --- |",
        "| `count` | `3` | 1 to 5 | how many |",
        "| `wait_s` | `0.5` | > 0 | how long |",
        "| `share` | `0.9` | > 0, < 1 | how much |",
        "| `mode` | `\"a\"` | `a`, `b` | which |",
        "| `name` | `\"x\"` | `^(x\\|y)$`; 1 to 8 characters | a \\| in text |",
        "| `path` | none |  |  |",
    ]


def test_a_key_without_description_is_named() -> None:
    class Root(BaseModel):
        demo: _Demo = _Demo()

    assert undocumented(Root) == ["demo.path"]


def test_blocks_and_tables_must_match() -> None:
    block = "<!-- generated: a -->\nold\n<!-- end generated -->\n"
    assert fill("intro\n" + block + "outro\n", {"a": "new\n"}) == (
        "intro\n<!-- generated: a -->\nnew\n<!-- end generated -->\noutro\n")
    with pytest.raises(DocError, match=r"no block for \['b'\]"):
        fill(block, {"a": "", "b": ""})
    with pytest.raises(DocError, match=r"no table for the block\(s\) \['a'\]"):
        fill(block, {})
    with pytest.raises(DocError, match="not closed"):
        fill("<!-- generated: a -->\nold\n", {"a": ""})
    with pytest.raises(DocError, match="twice"):
        fill(block + block, {"a": ""})
