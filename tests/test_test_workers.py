"""`make test` runs two xdist workers: the conftest keeps each file on one worker, the trained demo's users together,
and gives each worker its share of the cores."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests import conftest
from tests.conftest import PYTHON, ROOT


@dataclass
class _Item:
    path: Path
    fixturenames: tuple[str, ...]
    markers: list[Any] = field(default_factory=list)

    def add_marker(self, marker: Any) -> None:
        self.markers.append(marker)


def test_each_file_is_one_group_and_the_trained_demos_users_share_one() -> None:
    items = [_Item(Path("tests/test_a.py"), ("tmp_path",)), _Item(Path("tests/test_a.py"), ("trained_demo",)),
             _Item(Path("tests/test_b.py"), ("trained_demo", "tmp_path")), _Item(Path("tests/test_b.py"), ())]
    conftest.pytest_collection_modifyitems(items)  # type: ignore[arg-type]
    groups = [item.markers[0].mark.args[0] for item in items]
    assert groups == ["test_a.py", "trained-demo", "trained-demo", "test_b.py"]
    assert all(item.markers[0].mark.name == "xdist_group" for item in items)


@pytest.mark.parametrize(("workers", "expected"), [("2", str(max(1, (os.cpu_count() or 1) // 2))), ("1", "unset")])
def test_each_worker_gets_its_share_of_the_cores(workers: str, expected: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTEST_XDIST_WORKER_COUNT"] = workers
    program = "import os, tests.conftest; print(os.environ.get('OMP_NUM_THREADS', 'unset'))"
    done = subprocess.run([PYTHON, "-c", program], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == expected
