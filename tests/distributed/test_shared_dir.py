"""A node-local output_dir is refused at start-up, naming the ranks that cannot see it.

Two spawned gloo ranks stand for two nodes: rank 1 is handed another directory, as a
node with its own local disk mounted at the same path would see one. On a shared
directory the check passes and leaves no file behind.
"""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest

from helpers import free_port, run_until, set_rank_env


def _rank(rank: int, world: int, port: int, dirs: list[str], result: str) -> None:
    set_rank_env(rank, world, port)
    from gptqflow.errors import GptqflowError
    from gptqflow.framework.distributed import DistContext

    ctx = DistContext.from_environment(backend="gloo", device="cpu", timeout_s=30)
    try:
        ctx.check_shared_dir(Path(dirs[rank]))
        outcome = "ok"
    except GptqflowError as exc:
        outcome = f"refused: {exc}"
    finally:
        ctx.close()
    Path(result).with_suffix(f".{rank}").write_text(outcome)


def _check(tmp_path: Path, dirs: list[Path]) -> list[str]:
    ctx = mp.get_context("spawn")
    port = free_port()
    result = str(tmp_path / "result")
    procs = [
        ctx.Process(target=_rank, args=(r, 2, port, [str(d) for d in dirs], result))
        for r in range(2)
    ]
    codes, _ = run_until(procs, 60)
    assert codes == [0, 0]
    return [(tmp_path / f"result.{r}").read_text() for r in range(2)]


def test_shared_output_dir_passes_and_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    assert _check(tmp_path, [out, out]) == ["ok", "ok"]
    assert not list(out.iterdir())


@pytest.mark.parametrize("rank1_dir_exists", [True, False])
def test_node_local_output_dir_is_refused_naming_the_rank(
    tmp_path: Path, rank1_dir_exists: bool
) -> None:
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    node0.mkdir()
    if rank1_dir_exists:
        node1.mkdir()
    answers = _check(tmp_path, [node0, node1])
    for text in answers:
        assert text.startswith("refused: ")
        assert "is not shared between the ranks: rank 1 on " in text
        assert "file system all nodes mount" in text
    assert not list(node0.iterdir()), "the probe file is removed"
