"""The names the analysis offers (laws, rho forms, bootstrap units), defined once and importable without numpy,
scipy or pandas, so that the command line lists them as choices before loading anything heavy."""
LAW_NAMES = ("decoupled", "unified", "kumar", "frantar")
RHO_FORMS = ("tanh", "logistic", "ratio")
RESAMPLING_UNITS = ("formats", "cells")
MAX_REPLICATES = 100_000  # bootstrap replicates: the most a command runs and a saved fit may hold


class FitWarning(UserWarning):
    """A fit whose numbers should not be read as they stand: a constant at its bound, an unidentified term."""
