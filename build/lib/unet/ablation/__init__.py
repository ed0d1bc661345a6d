"""The zero-init ablation: the grid file (``grid``), the runner, the run store, the numbers
(``summary``: measures, statistics, conclusions) and the report (plots and Markdown)."""
