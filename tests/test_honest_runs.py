"""Issue 19 (honest runs): a result is labelled with what produced it, nothing a user asked for is
silently changed or ignored; the experiment tooling in its own subpackage without import cycles."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(ROOT, "vlprompt", "experiments")


def experiments_imports():
    """module -> the vlprompt.experiments modules it imports (at any depth of its code)."""
    names = {f[:-3] for f in os.listdir(EXPERIMENTS) if f.endswith(".py") and f != "__init__.py"}
    graph = {}
    for name in names:
        tree = ast.parse(open(os.path.join(EXPERIMENTS, f"{name}.py")).read())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level == 1 and not module:  # from . import x
                    found |= {a.name for a in node.names if a.name in names}
                elif node.level == 1 or module.startswith("vlprompt.experiments."):
                    found.add(module.split(".")[-1])
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[-1] for a in node.names if a.name.startswith("vlprompt.experiments.")}
        graph[name] = found & names
    return graph


def test_experiment_tooling_has_no_import_cycle():
    graph = experiments_imports()
    assert {"run", "sweep", "report", "report_figures", "results", "layout"} <= set(graph)
    assert "report" not in graph["report_figures"]  # they imported each other

    def visit(name, path):
        assert name not in path, f"import cycle: {' -> '.join(path + [name])}"
        for other in graph[name]:
            visit(other, path + [name])

    for name in graph:
        visit(name, [])
