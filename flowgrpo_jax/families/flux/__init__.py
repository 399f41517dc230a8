"""The FLUX.1 family's data: `flux1dev/` holds FLUX.1-dev's component configs, for its shapes
without weights (the transformer is models/flux.py, its key table models/flux_table.py)."""
