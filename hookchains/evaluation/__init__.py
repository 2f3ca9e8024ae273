"""How good a sub-network is: faithfulness, pruning baselines, robustness, held-out generalisation, the
random-weights control."""
