"""End to end: run folders, extract, sweeps of many tasks, export, the offline demo."""
