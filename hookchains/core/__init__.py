"""The method's core: sites, model state, score hooks, fit (Eq. 8), the Subnetwork result, materialize, metrics."""
