"""Arena, engine loop, predictor, scheduler policies, metrics, traces."""
