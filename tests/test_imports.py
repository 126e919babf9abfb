"""The package's import graph: no cycle, even through imports inside functions."""

from __future__ import annotations

from .importgraph import TESTS, find_cycle, import_graph, module_sources


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert "vaulttmpfs.node.agent" in graph and graph["vaulttmpfs.entry"], "the walk found no modules"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_sees_a_cycle_through_a_function_level_import():
    graph = import_graph(sources={
        "vaulttmpfs.a": "from . import b\n",
        "vaulttmpfs.b": "def late():\n    from .a import thing\n",
        "vaulttmpfs.c": "from .b import late\n",
    })
    assert find_cycle(graph) in (["vaulttmpfs.a", "vaulttmpfs.b", "vaulttmpfs.a"],
                                 ["vaulttmpfs.b", "vaulttmpfs.a", "vaulttmpfs.b"])


def test_no_test_module_imports_another():
    tests = module_sources(TESTS)
    graph = import_graph(sources=tests)
    assert "tests.agents" in graph["tests.test_agent"], "the walk missed the support modules"
    found = {(module, target) for module, targets in graph.items() for target in targets
             if module.startswith("tests.test_") and target.startswith("tests.test_")}
    assert not found, f"test modules importing test modules (move the shared part to a support module): {sorted(found)}"
