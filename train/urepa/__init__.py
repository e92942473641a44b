"""Helpers for ``train_sd15.py`` (U-REPA on SD-1.5): EMA, guided sampling, checkpoint I/O, data wiring."""
