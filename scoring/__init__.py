"""Quality and cost scoring of candidate blocks (installed as `puzzle.scoring`)."""
