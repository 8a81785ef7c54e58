from puzzle.cli import entry

raise SystemExit(entry())
