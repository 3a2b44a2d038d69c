"""Using trained weights: evaluation passes, prediction and export."""
