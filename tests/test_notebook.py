"""The notebook under notebooks/ runs top to bottom on a tiny run directory and draws its figures."""

import json
import re
import warnings
from pathlib import Path

import pytest
from tiny_run import tiny_run_dir

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "fronts.ipynb"

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")


def _run_with_front(tmp_path_factory) -> Path:
    """The shared tiny run, with its front measured once (front.csv)."""
    from puzzle.baselines import open_run
    from puzzle.io import read_json
    from puzzle.pipeline import read_architecture, realize_and_measure, write_front

    run = open_run(tiny_run_dir(tmp_path_factory), progress=False)
    if not (run.out / "front.csv").is_file():
        names = read_json(run.out / "search" / "chosen.json")["names"]
        summary, _, _ = realize_and_measure(run, {n: read_architecture(run, n) for n in names})
        write_front(run, summary, names[0])
    return run.out


def _execute(run_dir: Path, allow_errors: bool = False):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", allow_errors=allow_errors,
                            resources={"metadata": {"path": str(run_dir)}}).execute()
    return nb


def test_notebook_draws_the_front_and_the_architecture_map(tmp_path_factory, monkeypatch):
    run_dir = _run_with_front(tmp_path_factory)
    monkeypatch.setenv("PUZZLE_RUN", str(run_dir))
    scratch = tmp_path_factory.mktemp("kernel-tmp")  # the kernel's temporary folder: left empty when it stops
    monkeypatch.setenv("TMPDIR", str(scratch))
    nb = _execute(run_dir)
    assert not [p for p in scratch.iterdir() if p.name.startswith("puzzle-notebook-")]
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the front and the architecture map
    tables = [o["data"]["text/plain"] for o in outputs if "text/plain" in o.get("data", {})]
    assert any("child-1.5x" in t for t in tables)


def test_notebook_keeps_its_figures_where_puzzle_figures_says_and_never_in_the_run(tmp_path_factory, monkeypatch):
    """Breaker: PUZZLE_FIGURES set to the run directory replaced the run's own front.png."""
    run_dir = _run_with_front(tmp_path_factory)
    figures = tmp_path_factory.mktemp("figures") / "kept"
    monkeypatch.setenv("PUZZLE_RUN", str(run_dir))
    monkeypatch.setenv("PUZZLE_FIGURES", str(figures))
    _execute(run_dir)
    assert sorted(p.name for p in figures.iterdir()) == ["architectures.png", "front.png"]
    for inside in (run_dir, run_dir / "export" / "child-1.5x"):  # the run, or a folder in it (an export)
        monkeypatch.setenv("PUZZLE_FIGURES", str(inside))
        with pytest.raises(nbclient.exceptions.CellExecutionError, match="is the run directory or inside it"):
            _execute(run_dir)
    # run past that error (breaker: the later cells drew into the run, its front.png replaced): they fail instead
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    nb = _execute(run_dir, allow_errors=True)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    monkeypatch.setenv("PUZZLE_RUN", str(figures))  # not a run: named, with the variable to set
    with pytest.raises(nbclient.exceptions.CellExecutionError, match="set PUZZLE_RUN"):
        _execute(run_dir)


def test_a_relative_run_is_found_from_the_repository_root_as_well(tmp_path_factory, monkeypatch):
    """Breaker: the default PUZZLE_RUN=runs/demo was looked for under notebooks/ (the kernel's folder) only."""
    run_dir = _run_with_front(tmp_path_factory)
    kernel_folder = run_dir.parent / "notebooks"  # a run beside notebooks/, as runs/demo is in the repository
    kernel_folder.mkdir(exist_ok=True)
    monkeypatch.setenv("PUZZLE_RUN", run_dir.name)
    monkeypatch.delenv("PUZZLE_FIGURES", raising=False)
    nb = _execute(kernel_folder)
    assert str(run_dir.resolve()) in "".join(o.get("text", "") for o in nb.cells[1].outputs)


def test_a_damaged_front_or_search_record_stops_the_notebook_with_the_command_that_writes_it(tmp_path_factory,
                                                                                            monkeypatch):
    """Breaker: a front.csv cut to 200 bytes drew a front without our children and no word; a missing child record
    or a damaged chosen.json showed a bare FileNotFoundError / JSONDecodeError."""
    import shutil

    from puzzle import plots
    from puzzle.errors import PuzzleError

    copy = tmp_path_factory.mktemp("damaged") / "run"
    shutil.copytree(_run_with_front(tmp_path_factory), copy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a current front draws without a word
        assert list(plots.searched_choices(copy)) and len(plots.current_front_rows(copy))
    # breaker: a front timed at batch 2 was drawn without a word after the run was rescored at batch 16
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "target": {**config["target"], "batch_size": 16}}))
    with pytest.warns(UserWarning, match=r"front.csv is out of date \(the settings changed \(target.batch_size: "
                                         r"2 -> 16\)\), so its rows are drawn as they stand: `puzzle front --out"):
        plots.current_front_rows(copy)
    (copy / "config.json").write_text(json.dumps(config))
    front = (copy / "front.csv").read_bytes()
    (copy / "front.csv").write_bytes(front[:200])
    monkeypatch.setenv("PUZZLE_RUN", str(copy))
    nb = _execute(copy)  # said where the front is drawn (a hand edit may be meant; `puzzle front` redoes it)
    said = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "not the file front.json was written with (cut or edited), so its rows are drawn as they stand" in said
    (copy / "front.csv").write_bytes(front)
    name = plots.searched_choices(copy)
    (copy / "search" / f"{next(iter(name))}.json").unlink()
    with pytest.raises(PuzzleError, match=r"is missing or damaged .*`puzzle search --out"):
        plots.searched_choices(copy)
    (copy / "search" / "chosen.json").write_text("{")
    with pytest.raises(PuzzleError, match="chosen.json is missing, unreadable"):
        plots.searched_choices(copy)


def test_a_run_searched_but_not_measured_still_gets_its_architecture_map(tmp_path_factory, monkeypatch):
    """Breaker: on a run whose front was not measured yet the notebook stopped at the front's cell, so the
    architecture map, which needs the search alone, was never drawn."""
    import shutil

    copy = tmp_path_factory.mktemp("searched") / "run"
    shutil.copytree(tiny_run_dir(tmp_path_factory), copy)
    for made in ("front.csv", "front_rows", "baselines"):
        shutil.rmtree(copy / made) if (copy / made).is_dir() else (copy / made).unlink(missing_ok=True)
    monkeypatch.setenv("PUZZLE_RUN", str(copy))
    monkeypatch.delenv("PUZZLE_FIGURES", raising=False)
    nb = _execute(copy)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert "no front to draw yet" in "".join(o.get("text", "") for o in outputs)
    assert len([o for o in outputs if "image/png" in o.get("data", {})]) == 1  # the architecture map
    shutil.rmtree(copy / "search")  # a breaker: bld and score done, not searched: the map's cell raised
    outputs = [o for c in _execute(copy).cells if c.cell_type == "code" for o in c.outputs]
    assert re.search(r"no architecture map yet: .*chosen\.json is missing", "".join(o.get("text", "") for o in outputs))
    assert not [o for o in outputs if "image/png" in o.get("data", {})]
