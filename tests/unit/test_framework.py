"""Pure framework pieces: sharding, the world-size-1 context, name patterns, group-size checks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gptqflow.errors import GptqflowError
from gptqflow.framework.distributed import DistContext, shard_range
from gptqflow.framework.registry import registered
from gptqflow.modeling.structure import group_size_problems, matches


@given(st.integers(0, 500), st.integers(1, 64))
def test_shards_cover_every_item_once_and_differ_by_at_most_one(n: int, world: int) -> None:
    parts = [shard_range(n, r, world) for r in range(world)]
    assert [i for p in parts for i in p] == list(range(n))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_shard_range_rejects_bad_rank() -> None:
    with pytest.raises(ValueError):
        shard_range(10, 2, 2)


def test_world_size_one_context_uses_the_same_verbs() -> None:
    ctx = DistContext()
    t = torch.arange(4.0)
    out, handle = ctx.all_reduce_sum(t)
    handle.wait()
    assert out is t
    bufs, handles = ctx.broadcast_from(0, [t, t.int()])
    for h in handles:
        h.wait()
    assert torch.equal(bufs[0], t) and bufs[1].dtype == torch.int32
    assert ctx.gather_objects({"a": 1}) == [{"a": 1}]
    assert ctx.shard(5) == range(5) and ctx.is_main
    ctx.check_same("recipe", "x")  # one rank always agrees with itself
    ctx.barrier("test")


def test_name_patterns() -> None:
    name = "model.layers.3.self_attn.q_proj"
    assert matches(name, ["q_proj"]) and matches(name, [name]) and matches(name, ["re:.*attn.*"])
    assert not matches(name, ["proj"]) and not matches(name, ["re:q_proj"])


def test_group_size_suggestion() -> None:
    shapes = {"a": (576, 576), "b": (576, 1536)}
    (msg,) = group_size_problems(shapes, 128)
    assert "[576]" in msg and "64 or 32" in msg
    assert group_size_problems(shapes, 64) == [] and group_size_problems(shapes, -1) == []


def test_every_stage_registered_with_forbidding_config() -> None:
    specs = registered()
    assert set(specs) == {
        "load",
        "partition",
        "calibrate",
        "hessian-reduce",
        "solve",
        "broadcast",
        "float-path",
        "save",
        "evaluate",
    }
    for name, spec in specs.items():
        assert spec.config_cls.model_config.get("extra") == "forbid", name
        assert spec.config_cls.__doc__, name
        for field, info in spec.config_cls.model_fields.items():
            if field not in ("stage", "id"):
                assert info.description, f"{name}.{field} has no description"
        module = __import__(spec.impl_cls.__module__, fromlist=["_"])
        assert "```yaml" in (module.__doc__ or ""), f"{name}: module docstring needs a YAML example"


def test_plan_command_prints_both_planners(capsys: pytest.CaptureFixture[str]) -> None:
    from gptqflow.cli import main
    from gptqflow.framework.compose import project_root

    cfg = project_root() / "configs" / "llama3-8b.json"
    assert main(["plan", str(cfg), "--world-sizes", "2,8"]) == 0
    out = capsys.readouterr().out
    assert "llama3-8b" in out and "ours" in out and "columns" in out
    assert main(["plan", str(cfg), "--world-sizes", "0"]) == 1
    assert "--world-sizes" in capsys.readouterr().err


def test_launcher_inserts_its_overrides_next_to_the_users() -> None:
    """Hydra takes overrides as one run of words: ours must not land after a flag."""
    from gptqflow.framework.launcher import _add_overrides, _place_hydra_dirs

    extra = ["hydra.job.name=run"]
    assert _add_overrides(["a=1", "--cfg", "job"], extra) == ["a=1", *extra, "--cfg", "job"]
    assert _add_overrides(["--cfg", "job"], extra) == ["--cfg", "job", *extra]
    assert _add_overrides(["-m", "a=1,2", "b=3"], extra) == ["-m", "a=1,2", "b=3", *extra]
    assert _place_hydra_dirs(["output_dir=o", "--cfg", "job"]) == [
        "output_dir=o",
        "hydra.run.dir=o",
        "--cfg",
        "job",
    ]
    assert _place_hydra_dirs(["-m", "output_dir=s", "x=1,2"]) == [
        "-m",
        "x=1,2",
        "hydra.sweep.dir=s",
    ]


def test_frozen_heap_keeps_the_collector_off_old_objects_and_still_collects_new_garbage() -> None:
    import gc
    import weakref

    from gptqflow.framework.layerloop import frozen_heap

    class Node:
        def __init__(self) -> None:
            self.me = self  # a cycle: only the cyclic collector frees it

    old = Node()
    with frozen_heap():
        assert gc.get_freeze_count() > 0
        new = Node()
        alive = weakref.ref(new)
        del new
        gc.collect()
        assert alive() is None, "garbage made inside the loop is still collected"
    assert gc.get_freeze_count() == 0
    assert old.me is old


def test_no_registered_stage_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Source on PYTHONPATH without the installed package: no entry points, no stages."""
    from gptqflow.framework import registry

    monkeypatch.setattr(registry, "_REGISTRY", {})
    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.setattr(registry, "entry_points", lambda group: [])
    with pytest.raises(GptqflowError, match=r"no stage is registered.*pip install -e"):
        registry.registered()
