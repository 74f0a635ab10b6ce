"""Entry point of the hmst distribution: registers the `hmst` architecture once its model exists
(nothing is registered yet). Imports neither torch nor faiss, so loading it costs nothing."""
