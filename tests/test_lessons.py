"""Every ```python block of every lesson runs, in order, against micro artefacts in out/micro;
every `file.py: name` reference names something that exists."""
import importlib
import re
import shutil
from pathlib import Path

import pytest

LESSONS = sorted((Path(__file__).resolve().parent.parent / "lessons").glob("*.md"))


def test_there_are_twelve_lessons():
    assert len(LESSONS) >= 12


@pytest.mark.parametrize("lesson", LESSONS, ids=lambda p: p.stem)
def test_lesson_code_runs(lesson, micro_demo, tmp_path, monkeypatch):
    shutil.copytree(micro_demo, tmp_path / "out" / "micro")
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", lesson.read_text(), re.S)
    namespace = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{lesson.name}[block {i}]", "exec"), namespace)


@pytest.mark.parametrize("lesson", LESSONS, ids=lambda p: p.stem)
def test_lesson_references_exist(lesson):
    for path, name in re.findall(r"`((?:data/)?\w+)\.py: ([\w.]+)`", lesson.read_text()):
        obj = importlib.import_module(path.replace("/", "."))
        for part in name.split("."):
            assert hasattr(obj, part), f"{lesson.name}: {path}.py: {name}"
            obj = getattr(obj, part)
