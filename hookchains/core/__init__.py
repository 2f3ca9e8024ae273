"""The method's core: sites, model state, score hooks, fit (Eq. 8, the one optimisation loop), the results' base and the Subnetwork result, materialize, metrics."""
