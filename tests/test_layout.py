"""The package's layout: core below the front-ends, no import circle, d2 never imports tv."""
import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "iou_aware_retinanet")


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(PACKAGE))[: -len(".py")].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _imports():
    """module -> the package's modules it imports (anywhere in its file, function-local too)."""
    graph = {}
    for root, _, files in os.walk(PACKAGE):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(root, f)
            name = _module_name(path)
            package = name if f == "__init__.py" else name.rsplit(".", 1)[0]
            found = set()
            for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
                if isinstance(node, ast.ImportFrom):
                    base = package.split(".")
                    if node.level:
                        base = base[: len(base) - node.level + 1]
                        target = ".".join(base + ([node.module] if node.module else []))
                    else:
                        target = node.module or ""
                    if target.startswith("iou_aware_retinanet"):
                        found.add(target)
                        found.update(f"{target}.{a.name}" for a in node.names)
                elif isinstance(node, ast.Import):
                    found.update(a.name for a in node.names if a.name.startswith("iou_aware_retinanet"))
            graph[name] = found
    modules = set(graph)
    return {m: {t for t in targets if t in modules and t != m} for m, targets in graph.items()}


def _without_packages(graph):
    """Edges through a package's __init__ (re-exports) replaced by nothing: cycles of real modules."""
    packages = {m for m in graph if os.path.isdir(os.path.join(os.path.dirname(PACKAGE), *m.split(".")))}
    return {m: {t for t in ts if t not in packages} for m, ts in graph.items() if m not in packages}


def test_no_import_circle():
    graph = _without_packages(_imports())
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for t in sorted(graph.get(m, ())):
            if state.get(t) == "open":
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


@pytest.mark.parametrize("below, above", [("iou_aware_retinanet.d2", "iou_aware_retinanet.tv"),
                                          ("iou_aware_retinanet.tv", "iou_aware_retinanet.d2"),
                                          ("iou_aware_retinanet.core", "iou_aware_retinanet.tv"),
                                          ("iou_aware_retinanet.core", "iou_aware_retinanet.d2")])
def test_layers(below, above):
    bad = {m: sorted(t for t in ts if t.startswith(above)) for m, ts in _imports().items() if m.startswith(below)}
    assert not {m: ts for m, ts in bad.items() if ts}
