"""The names the analysis offers (laws, rho forms, bootstrap units), defined once and importable without numpy,
scipy or pandas, so that the command line lists them as choices before loading anything heavy."""
LAW_NAMES = ("decoupled", "unified", "kumar", "frantar")
RHO_FORMS = ("tanh", "logistic", "ratio")
RESAMPLING_UNITS = ("formats", "cells")
STUDY_NAMES = ("quest", "t5", "cpu")  # the shipped studies (analysis.studies), in the order help lists them
DEFAULT_STUDY = "quest"  # the claim checked where the papers checked it: published runs at 30M-800M parameters
MAX_REPLICATES = 100_000  # bootstrap replicates: the most a command runs and a saved fit may hold


class FitWarning(UserWarning):
    """A fit whose numbers should not be read as they stand: a constant at its bound, an unidentified term."""
