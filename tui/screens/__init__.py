"""One module per wizard step, plus dialogs, the past-runs list and the plain run view."""
