"""The training loop's parts: the optimizer step, manual steps, the non-finite guard, stop signals,
the sanity pass, compilation and the run's length."""
